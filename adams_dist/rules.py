"""Element-wise update rules over lists of flat fp32 shards.

A rule sees only flat tensors (this rank's piece of each parameter's master weights, averaged
gradient and moments) plus per-tensor step counts. It never sees Parameter objects or process
groups; the one cross-shard quantity a rule may need (HomeAdam's min of v_hat) is requested
through ``reduce_min``, which the engine backs with a MIN all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensors = list[torch.Tensor]
ReduceMin = Callable[[torch.Tensor], torch.Tensor]
KERNELS = ("auto", "foreach", "compiled")


def _atan2_kernel(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, k_in: float,
                  den_mul: float, scale: float) -> None:
    """The whole atan2 update of one tensor; torch.compile fuses it into a single pass over memory."""
    m.lerp_(g, one_minus_b1)
    v.mul_(b2).addcmul_(g, g, value=one_minus_b2)
    p.add_(torch.atan2(m * k_in, v.sqrt() * den_mul) * scale)


def _adamw_kernel(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, sqrt_c2: float,
                  eps: float, scale: float) -> None:
    m.lerp_(g, one_minus_b1)
    v.mul_(b2).addcmul_(g, g, value=one_minus_b2)
    p.add_(m / (v.sqrt() / sqrt_c2 + eps) * scale)


_compiled_cache: dict[Callable, Callable] = {}
# Below this many elements a compiled call's fixed cost (guards, wrappers) exceeds what fusion saves.
COMPILED_MIN_NUMEL = 1 << 15


def _compiled(fn: Callable) -> Callable:
    """``fn`` compiled once per process (dynamic shapes, float scalars do not recompile)."""
    if fn not in _compiled_cache:
        _compiled_cache[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled_cache[fn]


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


class Rule:
    """An element-wise update: moments in, ``params -= update`` out.

    ``apply`` runs the portable path; rules with a ``kernel`` also run it compiled (``compiled=True``),
    one fused pass per tensor with the same arithmetic.
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
              group: dict[str, Any], lr: float, reduce_min: ReduceMin, compiled: bool = False) -> None:
        raise NotImplementedError


class _TensorwiseRule(Rule):
    """A rule whose update of one tensor is one function of (p, g, m, v, *scalars).

    Big tensors go through it one at a time: compiled into one fused kernel, or eagerly through a
    reused scratch buffer (no fresh full-size temporaries). Small tensors take the foreach ops,
    whose per-call cost is lower.
    """

    streamed: Callable

    def tensor_args(self, group: dict[str, Any], lr: float, t: float) -> tuple[float, ...]:
        raise NotImplementedError

    def foreach(self, params: Tensors, grads: Tensors, state: dict[str, Tensors], steps: Sequence[float],
                group: dict[str, Any], lr: float) -> None:
        raise NotImplementedError

    def apply(self, params, grads, state, steps, group, lr, reduce_min, compiled=False):
        assert self.kernel is not None
        update = _compiled(self.kernel) if compiled else self.streamed
        big = [i for i, p in enumerate(params) if p.numel() >= COMPILED_MIN_NUMEL]
        for i in big:
            update(params[i], grads[i], state["exp_avg"][i], state["exp_avg_sq"][i],
                   *self.tensor_args(group, lr, steps[i]))
        small = [i for i in range(len(params)) if i not in set(big)]
        if small:
            self.foreach(*_subset(small, params, grads, state, steps), group, lr)


def _atan2_streamed(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, k_in: float,
                    den_mul: float, scale: float) -> None:
    """``_atan2_kernel`` in eager ops through a reused scratch buffer."""
    m.lerp_(g, one_minus_b1)
    v.mul_(b2).addcmul_(g, g, value=one_minus_b2)
    den = torch.sqrt(v, out=_scratch(v)).mul_(den_mul / k_in)  # atan2(k*m, d) == atan2(m, d/k) for k > 0
    p.add_(torch.atan2(m, den, out=den), alpha=scale)


def _adamw_streamed(p, g, m, v, one_minus_b1: float, b2: float, one_minus_b2: float, sqrt_c2: float,
                    eps: float, scale: float) -> None:
    """``_adamw_kernel`` in eager ops through a reused scratch buffer."""
    m.lerp_(g, one_minus_b1)
    v.mul_(b2).addcmul_(g, g, value=one_minus_b2)
    p.addcdiv_(m, torch.sqrt(v, out=_scratch(v)).div_(sqrt_c2).add_(eps), value=scale)


class Atan2Rule(_TensorwiseRule):
    """p -= lr * k_out * a * atan2(m * k_in, b * sqrt(v / c2)); no epsilon.

    Bias correction 1 sits outside atan2 by default (k_out = 1/c1, the Adams and fused adam-atan2
    convention); ``bias_correction_in_atan2`` moves it inside (adam-atan2-pytorch). b = 0 makes the
    step sign descent.
    """

    name = "atan2"
    hyperparams = ("a", "b", "bias_correction_in_atan2")
    kernel = staticmethod(_atan2_kernel)
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
    kernel = staticmethod(_adamw_kernel)
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


class SRFRule(Rule):
    """AdamSRF (HomeAdam Algorithm 1): p -= lr * m_hat / (v_hat + eps), no square root."""

    name = "srf"
    hyperparams = ("eps",)

    def apply(self, params, grads, state, steps, group, lr, reduce_min, compiled=False):
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

    def apply(self, params, grads, state, steps, group, lr, reduce_min, compiled=False):
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


class HomeAdamEWRule(_TauRule):
    """HomeAdamEW (Algorithm 3): the HomeAdam switch made per element."""

    name = "homeadamew"
    hyperparams = ("eps", "tau")

    def apply(self, params, grads, state, steps, group, lr, reduce_min, compiled=False):
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        update_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        c1, c2 = bias_corrections(steps, beta1, beta2)
        eps, tau = float(group["eps"]), float(group["tau"])
        for p, m, v, a, b in zip(params, exp_avgs, exp_avg_sqs, c1, c2):
            # p -= lr/c1 * m * factor, factor = c2 / (v + eps*c2) where v_hat >= tau, else 1 (momentum-SGD)
            factor = _srf_denominator(v, b, eps).reciprocal_().mul_(b)
            factor.masked_fill_(v < tau * b, 1.0)
            p.addcmul_(m, factor, value=-lr / a)
