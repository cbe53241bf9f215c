"""The optimizer's state dict: full and world-size independent, checked before anything changes.

``state_dict`` gathers every parameter's state in the parameter's own shape (DTensors laid out like
the parameters under FSDP2), so it loads at any world size, and records the optimizer class and rule
(top-level keys that torch's own optimizers ignore). ``load_state_dict`` validates the whole dict
first (origin, structure, every hyperparameter as at construction, every state entry's type and
shape), then takes this rank's rows of each entry.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch

from . import ablations, fsdp, rounding, rules, validation
from .rules.base import finite_real

if TYPE_CHECKING:
    from .optimizer import ShardedOptimizer

CLASS_KEY, RULE_KEY = "optimizer_class", "rule"  # where state_dict() records its origin
# Param-group keys that are hyperparameters of some optimizer here (not e.g. a scheduler's "max_lr"):
# state dicts without CLASS_KEY are matched by these.
_HYPERPARAMS = {"lr", "weight_decay", "scalar_vector_weight_decay", *ablations.KEYS}


def _saved_ids(sd: dict[str, Any]) -> list[Any]:
    """State keys in parameter order, read from the saved groups (as torch.optim does)."""
    return [pid for group in sd["param_groups"] for pid in group["params"]]


@torch.no_grad()
def state_dict(opt: ShardedOptimizer, sharded: bool = False) -> dict[str, Any]:
    """The full state; ``sharded``: each rank's rows only (``Shards.sharded_state``), in ``Slot.rows_shape``."""
    if sharded and opt._ablated and opt.world_size > 1 and not opt._shards.takes_dtensors:
        raise ValueError("sharded_state_dict() does not support the second_moment/rotate options in ZeRO mode; "
                         "use state_dict()")
    shards = opt._shards
    full = shards.sharded_state(opt.state) if sharded else shards.gather_state(opt.state)
    sigmas = opt.spectral_sigmas()
    state: dict[int, dict[str, Any]] = {}
    for slot in opt._shards.slots:
        p = slot.param
        entry: dict[str, Any] = {"step": opt.state[p]["step"].clone()}
        layout = opt._ablated.get(slot.index)
        for name, t in full[slot.index].items():
            if layout is not None and name in layout.saved_shapes:
                continue  # reduced second moment: exported below
            if fsdp.is_dtensor(t):
                entry[name] = t
            elif name == "u":
                entry[name] = t.view(slot.u_shape(sharded))
            else:
                entry[name] = t.view(slot.rows_shape() if sharded else p.shape)
        if "master_remainder" in entry:  # saved as the fp32 master it stands for: loads into any optimizer
            entry["master_param"] = _with_remainder(entry["master_param"], entry.pop("master_remainder"))
        if layout is not None:
            entry.update(layout.export(opt.state[p]))
        if p in sigmas:
            entry["sigma"] = sigmas[p].clone()
        state[slot.index] = entry
    index = {id(s.param): s.index for s in opt._shards.slots}
    groups = []
    for group in opt.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [index[id(p)] for p in group["params"]]
        groups.append(copy.deepcopy(g))
    return {"state": state, "param_groups": groups, CLASS_KEY: type(opt).__name__, RULE_KEY: opt.rule.name}


def _with_remainder(high: Any, remainder: torch.Tensor) -> torch.Tensor:
    """The fp32 master that a bf16 tensor and its int16 remainder stand for (DTensors stay DTensors)."""
    if not fsdp.is_dtensor(high):
        return rounding.combine(high.reshape(-1), remainder.reshape(-1)).view(high.shape)
    local = fsdp.local_tensor(high)
    full = rounding.combine(local.reshape(-1), fsdp.local_tensor(remainder).reshape(-1)).view(local.shape)
    return fsdp.DTensor.from_local(full, high.device_mesh, high.placements, run_check=False, shape=high.shape,
                                   stride=high.stride())


def _origin(opt: ShardedOptimizer) -> str:
    return f"{type(opt).__name__} (rule {opt.rule.name!r})"


def _check_origin(opt: ShardedOptimizer, sd: dict[str, Any]) -> bool:
    """Refuse another optimizer's state dict. Returns True for an older one without CLASS_KEY, whose
    hyperparameter names are compared instead here (and its state names per entry)."""
    if CLASS_KEY in sd or RULE_KEY in sd:
        if (sd.get(CLASS_KEY), sd.get(RULE_KEY)) != (type(opt).__name__, opt.rule.name):
            raise ValueError(f"the state dict was saved by {sd.get(CLASS_KEY)} (rule {sd.get(RULE_KEY)!r}); "
                             f"this optimizer is {_origin(opt)}")
        return False
    known = _HYPERPARAMS.union(*(rules.get(name).hyperparams for name in rules.names()))
    for gi, (mine, saved) in enumerate(zip(opt.param_groups, sd["param_groups"])):
        have, want = known.intersection(saved), known.intersection(mine)
        want -= set(ablations.KEYS) - have  # state dicts from before the ablations: loading keeps our values
        if have != want:
            raise ValueError(f"param group {gi} of the state dict has the hyperparameters {sorted(have)}; this "
                             f"{_origin(opt)} has {sorted(want)}: the state dict was saved by another optimizer")
    return True


def _check_group_values(opt: ShardedOptimizer, mine: dict[str, Any], saved: dict[str, Any], gi: int) -> None:
    """The group as loading would leave it, through the construction checks (on a copy)."""
    merged = {k: v for k, v in mine.items() if k != "params"}
    merged.update((k, v) for k, v in saved.items() if k not in ("params", "param_names"))
    try:
        validation.check_group(merged, opt.rule, "second_moment" in opt.defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"param group {gi} of the state dict: {e}") from e


def _check_entry_types(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"state dict entry for {where} is a {type(entry).__name__}, not a dict")
    step = finite_real(entry.get("step"), tensor_ok=True)
    if "step" in entry and (step is None or step < 0):
        raise ValueError(f"state dict 'step' for {where} is {entry['step']!r}, not a finite number >= 0")
    for name, t in entry.items():
        if name != "step" and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            kind = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise ValueError(f"state dict '{name}' for {where} is {kind}, not a floating-point tensor")


def _check_state_names(opt: ShardedOptimizer, entry: dict[str, Any], kept: set[str], where: str) -> None:
    """An older state dict's entry holds only what ``opt`` keeps (Adams' 'u' and 'sigma' besides ``kept``)."""
    extra = sorted(set(entry) - kept - ({"u", "sigma"} if opt.uses_spectral_decay else set()))
    if extra:
        raise ValueError(f"state dict entry for {where} holds {extra}, which {_origin(opt)} does not keep: "
                         "the state dict was saved by another optimizer")


def validate_state_dict(opt: ShardedOptimizer, sd: Any) -> None:
    """Raise ValueError naming the first thing in ``sd`` that does not fit ``opt``; change nothing."""
    sd = without_placeholders(sd)
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
    groups = sd["param_groups"]
    if not (isinstance(sd["state"], dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise ValueError("not an optimizer state dict: 'state' must be a dict and 'param_groups' a list of dicts "
                         "with a 'params' list")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state dict has {len(groups)} param groups, this optimizer has {len(opt.param_groups)}")
    legacy = _check_origin(opt, sd)
    for gi, (mine, saved) in enumerate(zip(opt.param_groups, groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(f"param group {gi}: state dict has {len(saved['params'])} params, "
                             f"this optimizer has {len(mine['params'])}")
        if not all(isinstance(pid, (int, str)) for pid in saved["params"]):
            raise ValueError(f"param group {gi}: state dict 'params' must hold ints or names")
        _check_group_values(opt, mine, saved, gi)
        if "second_moment" in mine:
            ablations.check_same_config(mine, saved, gi)
    required = ("step", "master_param", *opt.rule.state_names)
    saved_ids = _saved_ids(sd)
    for slot in opt._shards.slots:
        entry = sd["state"].get(saved_ids[slot.index])
        where = f"parameter #{slot.index} (shape {tuple(slot.param.shape)})"
        if entry is None:
            raise ValueError(f"state dict has no state for {where}")
        _check_entry_types(entry, where)
        layout = opt._ablated.get(slot.index)
        for name in required:
            if name not in entry:
                raise ValueError(f"state dict entry for {where} lacks '{name}'")
            if layout is not None and name in layout.saved_shapes:
                continue  # checked by layout.validate below
            if name != "step" and tuple(entry[name].shape) not in (tuple(slot.param.shape), slot.rows_shape()):
                raise ValueError(f"state dict '{name}' for {where} has shape {tuple(entry[name].shape)}")
        if legacy:
            _check_state_names(opt, entry, {*required, *(layout.saved_shapes if layout else ())}, where)
        if layout is not None:
            layout.validate(entry, where)
        if slot.spectral is not None:
            if "u" not in entry or entry["u"].numel() != math.prod(slot.u_shape(True)):
                raise ValueError(f"state dict entry for {where} lacks a matching spectral 'u'")
            sigma = entry.get("sigma")
            if sigma is not None and sigma.numel() != slot.spectral.heads:
                raise ValueError(f"state dict 'sigma' for {where} has {sigma.numel()} heads, "
                                 f"this optimizer has {slot.spectral.heads} (was set_heads applied the same way?)")


def without_placeholders(sd: Any) -> Any:
    """``sd`` without empty-dict entries: torch's ``set_optimizer_state_dict`` builds each parameter's entry
    from the names in ``optimizer.state`` and hands ``{}`` for one the saved dict lacks (Adams' live
    'sigma_sq', saved as 'sigma')."""
    if not (isinstance(sd, dict) and isinstance(sd.get("state"), dict)):
        return sd
    state = {k: {n: v for n, v in e.items() if not (isinstance(v, dict) and not v)} if isinstance(e, dict) else e
             for k, e in sd["state"].items()}
    return dict(sd, state=state)


@torch.no_grad()
def load_state_dict(opt: ShardedOptimizer, sd: dict[str, Any]) -> None:
    sd = without_placeholders(sd)
    validate_state_dict(opt, sd)
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        for k, v in saved.items():
            if k not in ("params", "param_names"):
                group[k] = copy.deepcopy(v)
    shards, saved_ids = opt._shards, _saved_ids(sd)
    for slot in shards.slots:
        entry = sd["state"][saved_ids[slot.index]]
        state = opt.state[slot.param]
        state["step"].copy_(torch.as_tensor(entry["step"]))
        layout = opt._ablated.get(slot.index)
        for name in ("master_param", *opt.rule.state_names):
            if name == "master_param" and "master_remainder" in state:  # the bf16 parameter and the remainder
                rows = shards.rows_of(slot, entry[name]).to(torch.float32)
                rounding.split_(rows, state["master_param"], state["master_remainder"])
            elif layout is None or name not in layout.saved_shapes:
                shards.load_rows(state, name, shards.rows_of(slot, entry[name]))
        if layout is not None:
            layout.load(state, entry)
        if slot.spectral is not None:
            state["u"].copy_(shards.rows_of(slot, entry["u"], per_row=True))
            sigma = entry.get("sigma")
            state["sigma_sq"].zero_()  # the sum over ranks is the square: rank 0 holds all of it
            if sigma is not None and shards.rank == 0:
                state["sigma_sq"].copy_(torch.as_tensor(sigma).square())
    shards.write_back(opt.state)
    shards.discard()
