"""Gradients in: each rank's averaged, unscaled gradient rows, their global norm, and clipping."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .control import Control
from .layout import Slot
from .shards import Grads

if TYPE_CHECKING:
    from .optimizer import ShardedOptimizer


def norm_sq(slots: list[Slot], grads: Grads, device: torch.device) -> torch.Tensor:
    """This rank's part of the squared global norm of ``grads`` (summed over the ranks by the caller)."""
    # a replica past the first adds nothing: its elements are counted where they first appear
    present = [g for s, g in zip(slots, grads) if g is not None and g.numel() and s.counts]
    if not present:
        return torch.zeros(1, dtype=torch.float32, device=device)
    norms = torch._foreach_norm(present)
    return torch.stack([n.float() for n in norms]).square().sum().reshape(1)


def averaged(opt: ShardedOptimizer, control: Control) -> Grads:
    """This rank's averaged gradient rows, with ``control`` reduced over the ranks and checked.

    Without the gradient norm the control all-reduce needs no reduced gradient: it goes right after
    the last reduce-scatter is issued, and its latency hides behind theirs.
    """
    shards, need_norm = opt._shards, opt.max_grad_norm is not None or opt.skip_nonfinite
    # A GradScaler (which sees _step_supports_amp_scaling) sets grad_scale and found_inf for this call.
    # Each rank unscales its own gradients as they are read: its scale may differ from the others'
    # (adams_dist.GradScaler keeps them equal, from found_inf_anywhere).
    scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    shards.inv_scale = 1.0 if scale is None else 1.0 / float(scale)
    if found_inf is not None:
        control.found_inf.copy_(found_inf.reshape(1))
    shards.start_reduce()
    control.edited.fill_(float(shards.edited()))
    if not need_norm:
        control.start(lambda t: shards.all_reduce(t, "the step's control all-reduce"))
    grads = shards.wait_reduce()
    if need_norm:
        control.grad_norm_sq = norm_sq(opt._slots, grads, opt.device)
        control.start(lambda t: shards.all_reduce(t, "the step's control all-reduce"))
    control.wait()
    opt.found_inf_anywhere = None if found_inf is None else control.found_inf.clamp(max=1.0)
    control.check_agreement(opt._steps_taken, lambda: shards.gather_json(
        opt._agreement_values(readable=True), "the comparison of the ranks"))
    if control.any_edited:  # some rank edited a gradient after its reduction read it
        grads = shards.reduce_again()
        if need_norm:
            control.grad_norm_sq = norm_sq(opt._slots, grads, opt.device)
            shards.all_reduce(control.grad_norm_sq, "the gradient-norm all-reduce").wait()
            control.grad_norm_sq_host = float(control.grad_norm_sq)
    return grads


def clip(opt: ShardedOptimizer, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``: average the gradients now, scale them to ``max_norm`` by their global norm."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    opt._check_grads()
    shards = opt._shards
    shards.set_context(f"clip_grad_norm_() before step {opt._steps_taken + 1}")
    shards.inv_scale = 1.0  # the gradients are unscaled by now (scaler.unscale_)
    grads = shards.wait_reduce()
    # With the norm goes whether any rank's gradients changed since overlap mode reduced them.
    partial = norm_sq(opt._slots, grads, opt.device)
    norm_edited = torch.cat([partial, partial.new_tensor([float(shards.edited())])])
    shards.all_reduce(norm_edited, "the gradient-norm all-reduce", side=True).wait()
    if float(norm_edited[1]) > 0:
        grads = shards.reduce_again()
        norm_edited[:1] = norm_sq(opt._slots, grads, opt.device)
        shards.all_reduce(norm_edited[:1], "the gradient-norm all-reduce", side=True).wait()
    norm = norm_edited[0].sqrt()
    shards.scale_grads(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    opt.last_grad_norm = norm
    return norm
