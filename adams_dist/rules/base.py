"""What the engine asks of a rule, and the pieces every rule shares.

A rule sees only flat tensors (this rank's piece of each parameter's master weights, averaged
gradient and state) plus per-tensor step counts. It never sees Parameter objects or process groups;
the one cross-shard quantity a rule may need (HomeAdam's min of v_hat) is requested through
``reduce_min``, which the engine backs with a MIN all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..decay import Decay
from .compiled import compile_supported

Tensors = list[torch.Tensor]
ReduceMin = Callable[[torch.Tensor], torch.Tensor]
KERNELS = ("auto", "foreach", "compiled", "background")

# Hyperparameters every rule checks when present: (lowest value, whether it is allowed).
_LOWER_BOUNDS = {"eps": (0.0, True), "a": (0.0, False), "b": (0.0, True), "tau": (0.0, False)}
_FLAGS = ("bias_correction_in_atan2", "per_tensor")  # truthiness of a string or a number would pass silently


def finite_real(value: Any, tensor_ok: bool = False) -> float | None:
    """``value`` as a float when it is a finite real number, else None. A bool is not a number here
    (``lr=True`` is a mistake, not 1.0); a one-element real tensor counts when ``tensor_ok``."""
    if tensor_ok and isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def adam_moments(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: float, beta2: float) -> None:
    """m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g^2, in place on one tensor (eager or traced)."""
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def adam_moments_foreach(grads: Tensors, ms: Tensors, vs: Tensors, beta1: float, beta2: float) -> None:
    """``adam_moments`` over lists of tensors, in three foreach calls."""
    torch._foreach_lerp_(ms, grads, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)


def widened(update: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``update`` on ``dtype`` copies of state stored in lower precision (``moment_dtype``), rounded back
    into the stored state afterwards: the step computes in the master's precision."""
    def run(g: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        wide = [s.to(dtype) for s in state]
        delta = update(g, *wide)
        for s, w in zip(state, wide):
            s.copy_(w)
        return delta

    return run


def apply_decays(params: Sequence[torch.Tensor], decays: Sequence[Decay]) -> None:
    """Each tensor's decay before its update; the scalar ones in one foreach call per distinct factor
    (a list of factors would take foreach's slow path)."""
    by_keep: dict[float, list[torch.Tensor]] = {}
    for p, d in zip(params, decays):
        if d.keep != 1.0 and not d.rank1:
            by_keep.setdefault(d.keep, []).append(p)
    for keep, ps in by_keep.items():
        torch._foreach_mul_(ps, keep)
    for p, d in zip(params, decays):
        if d.rank1:
            d.apply_(p)


class Rule:
    """An update rule as the engine drives it: decay and state in, ``params += update`` out.

    ``state_names`` are the per-tensor state buffers the engine keeps (and checkpoints) for the rule;
    ``hyperparams`` the param-group keys it reads besides ``lr``; ``required`` those without a default.
    """

    name = ""
    state_names: tuple[str, ...] = ()
    hyperparams: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    compilable = False

    def kernel_path(self, device: torch.device, requested: str = "auto") -> str:
        """Which path ``requested`` resolves to on ``device``: "compiled", "foreach" or "background" (eager
        until the compiled kernels, built in a thread, are ready; rules/background.py)."""
        if not self.compilable or requested == "foreach":
            return "foreach"
        if requested == "compiled":
            return "compiled"
        if requested == "background":
            return "background" if compile_supported(device) else "foreach"
        # auto: compile where it is cheap and pays off at once (CUDA + Triton); on CPU the first
        # compile takes tens of seconds, so it is opt-in there (kernel="compiled").
        return "compiled" if device.type == "cuda" and compile_supported(device) else "foreach"

    def validate(self, group: dict[str, Any]) -> None:
        for key in self.required:
            if key not in group:
                raise ValueError(f"the {self.name} rule needs the hyperparameter {key!r} in every param group")
        for key, (low, inclusive) in _LOWER_BOUNDS.items():
            if key not in group:
                continue
            value = finite_real(group[key])
            if value is None or not (value >= low if inclusive else value > low):
                raise ValueError(f"Invalid {key} value: {group[key]!r} (must be a finite float "
                                 f"{'>=' if inclusive else '>'} {low})")
        for key in _FLAGS:
            if key in group and not isinstance(group[key], bool):
                raise ValueError(f"Invalid {key} value: {group[key]!r} (must be True or False)")

    def apply(self, params: Tensors, grads: Tensors, state: dict[str, Tensors], steps: Sequence[float],
              group: dict[str, Any], lr: float, reduce_min: ReduceMin, decays: Sequence[Decay],
              compiled: Any = False, strict: bool = False) -> bool:
        """Decay and update every tensor in place. ``compiled``: True, or a ``BackgroundBuilds`` whose ready
        kernels to use. Returns False when compiled kernels were asked for but one could not be built and the
        eager path stood in (the engine then stops asking)."""
        raise NotImplementedError
