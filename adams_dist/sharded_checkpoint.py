"""Optimizer state saved sharded: every rank writes its own rows, and loading reshards to any world size.

``save_sharded_optimizer(directory, optimizer)`` writes ``optimizer.sharded_state_dict()`` with
torch.distributed.checkpoint (DCP), so no rank ever holds more than its own rows of the state (the
single-file ``save_checkpoint`` gathers the full state instead). ``load_sharded_optimizer`` builds
the same dict at the current world size, lets DCP read each rank's rows into it, and loads it
through the optimizer's validating ``load_state_dict``. Both are collective over the optimizer's
process group. The model is saved separately (its parameters are replicated in ZeRO mode).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .optimizer import ShardedOptimizer
from .state_io import CLASS_KEY, RULE_KEY

__all__ = ["load_sharded_optimizer", "save_sharded_optimizer"]

_KEY = "optimizer"  # the optimizer's entry in the DCP state dict


def _checked(optimizer: Any) -> ShardedOptimizer:
    if not isinstance(optimizer, ShardedOptimizer):
        raise TypeError(f"expected an adams_dist optimizer, got {type(optimizer).__name__}; "
                        "for other optimizers use torch.distributed.checkpoint.state_dict helpers")
    return optimizer


def _run(fn: Callable[..., Any], state: dict[str, Any], directory: str | os.PathLike[str],
         opt: ShardedOptimizer) -> None:
    """``dcp.save`` or ``dcp.load`` over the optimizer's group; in one process, without DCP's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=os.fspath(directory), process_group=opt.process_group,
           no_dist=not dist.is_initialized())


def _check_origin(directory: str | os.PathLike[str], opt: ShardedOptimizer) -> None:
    """Refuse another optimizer's checkpoint by name (DCP alone would fail on the first missing state key)."""
    mine = {CLASS_KEY: type(opt).__name__, RULE_KEY: opt.rule.name}
    saved = dict.fromkeys(mine, "")
    _run(dcp.load, {_KEY: saved}, directory, opt)
    if saved != mine:
        raise ValueError(f"{os.fspath(directory)!r} holds the state of {saved[CLASS_KEY]} (rule {saved[RULE_KEY]!r}); "
                         f"this optimizer is {mine[CLASS_KEY]} (rule {mine[RULE_KEY]!r})")


def save_sharded_optimizer(directory: str | os.PathLike[str], optimizer: torch.optim.Optimizer) -> None:
    """Write ``optimizer``'s state to the DCP directory ``directory``, each rank its own rows. Collective."""
    opt = _checked(optimizer)
    _run(dcp.save, {_KEY: opt.sharded_state_dict()}, directory, opt)


def load_sharded_optimizer(directory: str | os.PathLike[str], optimizer: torch.optim.Optimizer) -> None:
    """Restore ``optimizer`` from ``save_sharded_optimizer``'s directory, written at any world size. Collective.

    The optimizer is changed only once the whole state has been read and validated.
    """
    opt = _checked(optimizer)
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise FileNotFoundError(f"{os.fspath(directory)!r} holds no completed sharded checkpoint (no .metadata)")
    _check_origin(directory, opt)
    state = {_KEY: opt.sharded_state_dict()}
    _run(dcp.load, state, directory, opt)
    opt.load_state_dict(state[_KEY])
