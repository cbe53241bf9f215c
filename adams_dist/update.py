"""Stages (3) and (4) of a step: decay and the rule update of one group's master rows on this rank.

The element-wise update takes the compiled kernels where the optimizer's ``kernel`` allows; a kernel
that cannot be built under ``kernel="auto"`` sets ``kernel="foreach"`` at once, so the rest of the
step and every later one run eagerly.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from . import ablations, decay
from .layout import Slot
from .shards import Grads

if TYPE_CHECKING:
    from .optimizer import ShardedOptimizer


def update_group(opt: ShardedOptimizer, group: dict[str, Any], slots: list[Slot], grads: Grads,
                 wtu: dict[int, torch.Tensor], wv: dict[int, torch.Tensor]) -> None:
    """Count the step, apply decay and the rule to ``slots`` (the params of ``group`` that got a gradient)."""
    lr = float(group["lr"])
    states = [opt.state[s.param] for s in slots]
    for st in states:
        st["step"] += 1
    steps = [float(st["step"]) for st in states]
    stored, states = states, [opt.storage.wide_master(st) for st in states]  # computes on wide masters
    decays = [decay.plan(s, st, group, lr, opt.uses_spectral_decay, wtu.get(s.index), wv.get(s.index))
              for s, st in zip(slots, states)]
    if opt._ablation_cfg:  # AdamATan2/AdamW ablations: their params take a per-tensor path
        ablations.check_unchanged(group, opt._ablation_cfg[slots[0].group_index])
        for slot, st, t, dec in zip(slots, states, steps, decays):
            if slot.index in opt._ablated:
                dec.apply_(st["master_param"])
                opt._ablated[slot.index].update(opt.rule.name, st, grads[slot.index], t, group, lr)
        keep = [i for i, s in enumerate(slots) if s.index not in opt._ablated]
        slots, states = [slots[i] for i in keep], [states[i] for i in keep]
        steps, decays = [steps[i] for i in keep], [decays[i] for i in keep]
        if not slots:
            return
    masters = [st["master_param"] for st in states]
    full = [g if (g := grads[s.index]) is not None else torch.zeros_like(m) for s, m in zip(slots, masters)]
    apply = functools.partial(_apply_rule, opt, group, lr)
    if opt.moment_dtype == "8bit":
        fused = (functools.partial(_fused_8bit, opt, group, lr)
                 if hasattr(opt.rule, "update_8bit") and opt.kernel_path == "compiled" else None)
        opt.storage.apply_8bit(apply, opt.rule.state_names, states, masters, full, steps, decays, fused)
    else:
        apply(states, masters, full, steps, decays)
    opt.storage.store_masters(slots, stored, masters, steps)


def _apply_rule(opt: ShardedOptimizer, group: dict[str, Any], lr: float, states: list[dict[str, Any]],
                masters: list[torch.Tensor], grads: list[torch.Tensor], steps: list[float],
                decays: list[decay.Decay]) -> None:
    rule_state = {name: [st[name] for st in states] for name in opt.rule.state_names}
    path = opt.kernel_path
    compiled = opt._builds if path == "background" else path == "compiled"
    ok = opt.rule.apply(masters, grads, rule_state, steps, group, lr, functools.partial(_reduce_min, opt), decays,
                        compiled=compiled, strict=opt.kernel == "compiled")
    if compiled and not ok:  # a broken toolchain must not stop training when the user did not ask for it
        opt.kernel = "foreach"


def _fused_8bit(opt: ShardedOptimizer, group: dict[str, Any], lr: float, master: torch.Tensor, grad: torch.Tensor,
                st: dict[str, Any], step: float, keep: float) -> bool:
    """One tensor's decode, update and encode in one compiled call (element-wise rules, 8-bit moments)."""
    ok = opt.rule.update_8bit(master, grad, st, step, group, lr, keep,  # type: ignore[attr-defined]
                              strict=opt.kernel == "compiled")
    if not ok:  # as in _apply_rule: the eager path from here on
        opt.kernel = "foreach"
    return ok


def _reduce_min(opt: ShardedOptimizer, t: torch.Tensor) -> torch.Tensor:
    return opt._shards.reduce_min(t, opt._device)
