"""Element-wise update rules over lists of flat fp32 shards.

A rule sees only flat tensors (this rank's piece of each parameter's master weights, averaged
gradient and moments) plus per-tensor step counts. It never sees Parameter objects or process
groups; the one cross-shard quantity a rule may need (HomeAdam's min of v_hat) is requested
through ``reduce_min``, which the engine backs with a MIN all-reduce.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .atan2 import atan2_nonneg
from .decay import NO_DECAY, Decay  # noqa: F401 - re-exported for the engine

Tensors = list[torch.Tensor]
ReduceMin = Callable[[torch.Tensor], torch.Tensor]
KERNELS = ("auto", "foreach", "compiled")


def _moments(g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float) -> None:
    """One tensor's m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g^2, in place (eager or traced)."""
    m.lerp_(g, one_minus_b1)
    v.mul_(b2).addcmul_(g, g, value=one_minus_b2)


def _atan2_update(g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, k_in: float, den_mul: float,
                  scale: float) -> torch.Tensor:
    """Moments in place; returns the atan2 step of one tensor (the body of its compiled kernel)."""
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    return atan2_nonneg(m * k_in, v.sqrt() * den_mul) * scale


def _adamw_update(g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, sqrt_c2: float, eps: float,
                  scale: float) -> torch.Tensor:
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    return m / (v.sqrt() / sqrt_c2 + eps) * scale



_compiled_cache: dict[tuple[Callable, bool], Callable] = {}
# Below this many elements a compiled call's fixed cost (guards, wrappers) exceeds what fusion saves.
COMPILED_MIN_NUMEL = 1 << 15
# Inductor stores an intermediate to memory once it grows past a few dozen ops or reads (atan2's
# polynomial does), and a stored intermediate splits the kernel into two passes; these keep each
# update one loop. Options this torch does not know are left out.
_ONE_LOOP = {name: 10_000 for name in ("realize_opcount_threshold", "realize_cpu_opcount_threshold",
                                       "realize_reads_threshold", "realize_acc_reads_threshold",
                                       "realize_cpu_acc_reads_threshold")}


def _compiled(update: Callable, rank1: bool) -> Callable:
    """One tensor's decay + update as one kernel, compiled once per process (dynamic shapes).

    ``rank1=False``: ``p = keep * p + update`` over a flat tensor. ``rank1=True``: over a
    ``(heads, rows, cols)`` view, ``p = p - coef * wv * vt + update`` with wv ``(heads, rows, 1)`` and
    vt ``(heads, 1, cols)``: the spectral decay costs no pass over memory of its own.
    """
    key = (update, rank1)
    if key not in _compiled_cache:
        import torch._inductor.config as inductor_config

        options: dict[str, Any] = {k: v for k, v in _ONE_LOOP.items() if hasattr(inductor_config, k)}
        if rank1:
            def kernel(p, g, m, v, wv, vt, coef: float, *args: float) -> None:
                p.add_(update(g, m, v, *args) - wv * vt * coef)
        else:
            def kernel(p, g, m, v, keep: float, *args: float) -> None:  # type: ignore[misc]
                p.mul_(keep).add_(update(g, m, v, *args))
        # A code object of its own per (rule, kind): torch.compile caps the graphs kept per code object.
        name = f"{update.__name__.strip('_')}_{'rank1' if rank1 else 'flat'}_kernel"
        code = kernel.__code__.replace(co_name=name)
        kernel = types.FunctionType(code, kernel.__globals__, name, kernel.__defaults__, kernel.__closure__)
        _compiled_cache[key] = torch.compile(kernel, dynamic=True, fullgraph=True, options=options)
    return _compiled_cache[key]


def _subset(idx: list[int], params: Tensors, grads: Tensors, state: dict[str, Tensors], steps: Sequence[float]):
    pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
    return pick(params), pick(grads), {k: pick(v) for k, v in state.items()}, pick(list(steps))


_scratch_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """A reused buffer shaped like ``like``: fresh full-size temporaries cost page faults on every step."""
    key = (like.device, like.dtype)
    buf = _scratch_buffers.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = _scratch_buffers[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[: like.numel()].view(like.shape)


def compile_supported(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here: Triton for CUDA, a C++ compiler for CPU."""
    import shutil

    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return False


def update_moments(grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, beta1: float, beta2: float) -> None:
    """m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g^2."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)


def bias_corrections(steps: Sequence[float], beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    return [1.0 - beta1**t for t in steps], [1.0 - beta2**t for t in steps]


def decay_all(params: Tensors, decays: Sequence[Decay]) -> None:
    for p, d in zip(params, decays):
        d.apply_(p)


class Rule:
    """An element-wise update: decay and moments in, ``params -= update`` out.

    ``apply`` runs the portable path; rules with a ``kernel`` (the update body of one tensor) also
    run it compiled (``compiled=True``), one fused pass per tensor with the same arithmetic.
    ``apply`` returns False when a compiled kernel could not be built and the eager path stood in.
    """

    name = ""
    state_names: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    hyperparams: tuple[str, ...] = ()
    kernel: Callable | None = None

    def kernel_path(self, device: torch.device, requested: str = "auto") -> str:
        """Which path ``requested`` resolves to on ``device``: "compiled" or "foreach"."""
        if self.kernel is None or requested == "foreach":
            return "foreach"
        if requested == "compiled":
            return "compiled"
        # auto: compile where it is cheap and pays off at once (CUDA + Triton); on CPU the first
        # compile takes tens of seconds, so it is opt-in there (kernel="compiled").
        return "compiled" if device.type == "cuda" and compile_supported(device) else "foreach"

    def validate(self, group: dict[str, Any]) -> None:
        for key, low, inclusive in (("eps", 0.0, True), ("a", 0.0, False), ("b", 0.0, True)):
            if key not in group:
                continue
            value = group[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value >= low if inclusive else value > low)
            if not ok:
                raise ValueError(f"Invalid {key} value: {value!r} (must be a float {'>=' if inclusive else '>'} {low})")

    def apply(self, params: Tensors, grads: Tensors, state: dict[str, Tensors], steps: Sequence[float],
              group: dict[str, Any], lr: float, reduce_min: ReduceMin, decays: Sequence[Decay],
              compiled: bool = False, strict: bool = False) -> bool:
        raise NotImplementedError


class _TensorwiseRule(Rule):
    """A rule whose update of one tensor is one function of (g, m, v, *scalars).

    Big tensors go through it one at a time: compiled into one fused kernel together with their
    decay, or eagerly through a reused scratch buffer (no fresh full-size temporaries). Small
    tensors take the foreach ops, whose per-call cost is lower.
    """

    streamed: Callable

    def tensor_args(self, group: dict[str, Any], lr: float, t: float) -> tuple[float, ...]:
        raise NotImplementedError

    def foreach(self, params: Tensors, grads: Tensors, state: dict[str, Tensors], steps: Sequence[float],
                group: dict[str, Any], lr: float) -> None:
        raise NotImplementedError

    def apply(self, params, grads, state, steps, group, lr, reduce_min, decays, compiled=False, strict=False):
        small, ok = [], True
        for i, p in enumerate(params):
            if p.numel() < COMPILED_MIN_NUMEL:
                small.append(i)
                continue
            args = self.tensor_args(group, lr, steps[i])
            tensors = (p, grads[i], state["exp_avg"][i], state["exp_avg_sq"][i])
            ok = self._update_tensor(tensors, decays[i], args, compiled and ok, strict) or not compiled
        if small:
            decay_all([params[i] for i in small], [decays[i] for i in small])
            self.foreach(*_subset(small, params, grads, state, steps), group, lr)
        return ok

    def _update_tensor(self, tensors: tuple[torch.Tensor, ...], decay: Decay, args: tuple[float, ...],
                       compiled: bool, strict: bool) -> bool:
        """Decay + update of one big tensor, piece by piece (one piece per run of heads under spectral
        decay). Returns whether the compiled kernel is still in use."""
        pieces: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
        if not decay.rank1:
            pieces = [(tensors, ())]
        else:
            if decay.keep != 1.0:
                tensors[0].mul_(decay.keep)
            pieces = []
            for lo, hi, wv, vt in decay.runs:
                n, cols = wv.shape[0], decay.cols
                pieces.append((tuple(t[lo * cols: hi * cols].view(n, -1, cols) for t in tensors), (wv, vt)))
        for views, rank1 in pieces:
            if compiled:
                try:
                    extra = (*rank1, decay.coef) if rank1 else (decay.keep,)
                    _compiled(self.kernel, bool(rank1))(*views, *extra, *args)  # type: ignore[arg-type]
                    continue
                except Exception as err:  # build errors surface before the kernel touches any tensor
                    if strict:
                        raise RuntimeError(f"kernel='compiled' was requested but torch.compile failed: {err}") from err
                    warnings.warn(f"{self.name} rule: compiled kernel unavailable ({type(err).__name__}: {err}); "
                                  "running the same update through the eager path", RuntimeWarning, stacklevel=4)
                    compiled = False
            if rank1:
                views[0].baddbmm_(rank1[0], rank1[1], alpha=-decay.coef)
            else:
                views[0].mul_(decay.keep)
            self.streamed(*views, *args)
        return compiled


def _atan2_streamed(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, k_in: float,
                    den_mul: float, scale: float) -> None:
    """``_atan2_update`` in eager ops through a reused scratch buffer."""
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    den = torch.sqrt(v, out=_scratch(v)).mul_(den_mul / k_in)  # atan2(k*m, d) == atan2(m, d/k) for k > 0
    p.add_(torch.atan2(m, den, out=den), alpha=scale)


def _adamw_streamed(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, sqrt_c2: float,
                    eps: float, scale: float) -> None:
    """``_adamw_update`` in eager ops through a reused scratch buffer."""
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    p.addcdiv_(m, torch.sqrt(v, out=_scratch(v)).div_(sqrt_c2).add_(eps), value=scale)


class Atan2Rule(_TensorwiseRule):
    """p -= lr * k_out * a * atan2(m * k_in, b * sqrt(v / c2)); no epsilon.

    Bias correction 1 sits outside atan2 by default (k_out = 1/c1, the Adams and fused adam-atan2
    convention); ``bias_correction_in_atan2`` moves it inside (adam-atan2-pytorch). b = 0 makes the
    step sign descent.
    """

    name = "atan2"
    hyperparams = ("a", "b", "bias_correction_in_atan2")
    kernel = staticmethod(_atan2_update)
    streamed = staticmethod(_atan2_streamed)

    def tensor_args(self, group, lr, t):
        beta1, beta2 = group["betas"]
        a, b = float(group.get("a", 1.0)), float(group.get("b", 1.0))
        c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
        if group.get("bias_correction_in_atan2", False):
            return 1.0 - beta1, beta2, 1.0 - beta2, 1.0 / c1, b / math.sqrt(c2), -lr * a
        return 1.0 - beta1, beta2, 1.0 - beta2, 1.0, b / math.sqrt(c2), -lr * a / c1

    def foreach(self, params, grads, state, steps, group, lr):
        beta1, beta2 = group["betas"]
        a, b = float(group.get("a", 1.0)), float(group.get("b", 1.0))
        inside = bool(group.get("bias_correction_in_atan2", False))
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        update_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        c1, c2 = bias_corrections(steps, beta1, beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_mul_(denoms, [b / math.sqrt(c) for c in c2])
        nums = torch._foreach_div(exp_avgs, c1) if inside else exp_avgs
        for num, den in zip(nums, denoms):
            torch.atan2(num, den, out=den)
        scale = [-lr * a] * len(params) if inside else [-lr * a / c for c in c1]
        torch._foreach_mul_(denoms, scale)
        torch._foreach_add_(params, denoms)


class AdamWRule(_TensorwiseRule):
    """p -= lr * m_hat / (sqrt(v_hat) + eps)."""

    name = "adamw"
    hyperparams = ("eps",)
    kernel = staticmethod(_adamw_update)
    streamed = staticmethod(_adamw_streamed)

    def tensor_args(self, group, lr, t):
        beta1, beta2 = group["betas"]
        c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
        return 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(c2), float(group["eps"]), -lr / c1

    def foreach(self, params, grads, state, steps, group, lr):
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        update_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        c1, c2 = bias_corrections(steps, beta1, beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [math.sqrt(c) for c in c2])
        torch._foreach_add_(denoms, float(group["eps"]))
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / c for c in c1])


def _srf_denominator(v: torch.Tensor, c2: float, eps: float) -> torch.Tensor:
    """``v + eps*c2`` in the reused scratch buffer: m_hat / (v_hat + eps) == m * (c2/c1) / (v + eps*c2)."""
    return torch.add(v, eps * c2, out=_scratch(v))


def _srf_update(g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, eps_c2: float,
                scale: float) -> torch.Tensor:
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    return m / (v + eps_c2) * scale


def _srf_streamed(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, eps_c2: float,
                  scale: float) -> None:
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    p.addcdiv_(m, torch.add(v, eps_c2, out=_scratch(v)), value=scale)


class SRFRule(_TensorwiseRule):
    """AdamSRF (HomeAdam Algorithm 1): p -= lr * m_hat / (v_hat + eps), no square root.

    Computed as ``m * (c2/c1) / (v + eps*c2)``: the same quotient without forming m_hat or v_hat.
    """

    name = "srf"
    hyperparams = ("eps",)
    kernel = staticmethod(_srf_update)
    streamed = staticmethod(_srf_streamed)

    def tensor_args(self, group, lr, t):
        beta1, beta2 = group["betas"]
        c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
        return 1.0 - beta1, beta2, 1.0 - beta2, float(group["eps"]) * c2, -lr * c2 / c1

    def foreach(self, params, grads, state, steps, group, lr):
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        update_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        c1, c2 = bias_corrections(steps, beta1, beta2)
        eps = float(group["eps"])
        for p, m, v, a, b in zip(params, exp_avgs, exp_avg_sqs, c1, c2):
            p.addcdiv_(m, _srf_denominator(v, b, eps), value=-lr * b / a)


class _TauRule(Rule):
    def validate(self, group):
        super().validate(group)
        tau = group.get("tau")
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0.0):
            raise ValueError(f"Invalid tau value: {tau!r} (must be a float > 0)")


class HomeAdamRule(_TauRule):
    """HomeAdam (Algorithm 2): SRF step when min(v_hat) >= tau, else momentum-SGD (p -= lr * m_hat).

    The min runs over every element of the whole param group on every rank, so one element with a
    zero gradient history sends the group to momentum-SGD; ``per_tensor=True`` decides per tensor.
    """

    name = "homeadam"
    hyperparams = ("eps", "tau", "per_tensor")

    def apply(self, params, grads, state, steps, group, lr, reduce_min, decays, compiled=False, strict=False):
        decay_all(params, decays)
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        update_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        c1, c2 = bias_corrections(steps, beta1, beta2)
        eps, tau = float(group["eps"]), float(group["tau"])
        inf = torch.tensor(math.inf, dtype=torch.float64)
        mins = [v.min().cpu().double() / b if v.numel() else inf for v, b in zip(exp_avg_sqs, c2)]  # min v_hat
        local_mins = torch.stack(mins) if mins else inf[None]
        if group.get("per_tensor", False):
            use_srf = (reduce_min(local_mins) >= tau).tolist()
        else:
            use_srf = [bool(reduce_min(local_mins.min().reshape(1)) >= tau)] * len(params)
        for p, m, v, a, b, srf_ok in zip(params, exp_avgs, exp_avg_sqs, c1, c2, use_srf):
            if srf_ok:
                p.addcdiv_(m, _srf_denominator(v, b, eps), value=-lr * b / a)
            else:
                p.add_(m, alpha=-lr / a)
        return True


def _ew_update(g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, eps_c2: float, c2: float,
               tau_c2: float, scale: float) -> torch.Tensor:
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    return m * torch.where(v < tau_c2, 1.0, c2 / (v + eps_c2)) * scale


def _ew_streamed(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, eps_c2: float, c2: float,
                 tau_c2: float, scale: float) -> None:
    _moments(g, m, v, one_minus_b1, b2, one_minus_b2)
    factor = torch.add(v, eps_c2, out=_scratch(v)).reciprocal_().mul_(c2)
    factor.masked_fill_(v < tau_c2, 1.0)
    p.addcmul_(m, factor, value=scale)


class HomeAdamEWRule(_TauRule, _TensorwiseRule):
    """HomeAdamEW (Algorithm 3): the HomeAdam switch made per element.

    p -= lr/c1 * m * factor, factor = c2 / (v + eps*c2) where v_hat >= tau, else 1 (momentum-SGD).
    """

    name = "homeadamew"
    hyperparams = ("eps", "tau")
    kernel = staticmethod(_ew_update)
    streamed = staticmethod(_ew_streamed)

    def tensor_args(self, group, lr, t):
        beta1, beta2 = group["betas"]
        c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
        return (1.0 - beta1, beta2, 1.0 - beta2, float(group["eps"]) * c2, c2, float(group["tau"]) * c2,
                -lr / c1)

    def foreach(self, params, grads, state, steps, group, lr):
        for i, p in enumerate(params):
            self.streamed(p, grads[i], state["exp_avg"][i], state["exp_avg_sq"][i],
                          *self.tensor_args(group, lr, steps[i]))
