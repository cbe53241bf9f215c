"""torchtitan: an ``OptimizersContainer`` whose optimizers are adams_dist optimizers.

torchtitan builds its optimizers with ``config.optimizer.build(model_parts=...)``; a config returned by
:func:`adams_config` builds an :class:`AdamsOptimizersContainer` instead, which holds one adams_dist
optimizer per model part (and per optimizer name in ``param_groups``). Under FSDP2 each optimizer updates
its rank's local shard of every parameter. Checkpoints go through torchtitan's own flat, name-keyed
optimizer state dict (``state.<fqn>.exp_avg``, ...), so ``CheckpointManager`` saves and reshards them
like any torchtitan optimizer.

Importing this module imports torchtitan; ``import adams_dist`` does not.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..optimizer import ShardedOptimizer
from ..optimizers import create_optimizer

__all__ = ["ENGINE_OPTIONS", "AdamsOptimizersContainer", "adams_config", "build_adams_optimizers"]

# Constructor options of the engine (master_dtype, bucket_mb, max_grad_norm, ...). They configure a whole
# optimizer, so they belong in ``optimizer_factory_kwargs_by_name``; in a param group they would be kept as
# group entries and have no effect.
ENGINE_OPTIONS = frozenset(inspect.signature(ShardedOptimizer.__init__).parameters) - {
    "self", "params", "defaults", "unknown"}


class AdamsOptimizersContainer(OptimizersContainer):
    """torchtitan's optimizer container with adams_dist optimizers.

    ``Config.param_groups`` name adams_dist optimizers (``adams_dist.OPTIMIZERS``: "Adams", "AdamW", ...)
    and their hyperparameters; ``Config.optimizer_factory_kwargs_by_name`` holds engine options per
    optimizer name. ``Config.implementation`` (torch's fused/foreach switch) is ignored: the engine
    chooses its own kernel (engine option ``kernel``).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        for pg in config.param_groups:
            misplaced = sorted(ENGINE_OPTIONS.intersection(pg.optimizer_kwargs))
            if misplaced:
                raise ValueError(f"param group {pg.pattern!r}: {misplaced} are engine options; pass them in "
                                 f"optimizer_factory_kwargs_by_name[{pg.optimizer_name!r}]")
        super().__init__(config, model_parts=model_parts)

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Any:
        return functools.partial(create_optimizer, name)

    @staticmethod
    def _build_impl_kwargs(config: OptimizersContainer.Config) -> dict[str, Any]:
        return {}  # fused/foreach are torch.optim flags, which the engine does not take


def adams_config(name: str = "Adams", **kwargs: Any) -> AdamsOptimizersContainer.Config:
    """A config with one adams_dist optimizer ``name`` over every parameter of each model part.

    ``kwargs`` mixes hyperparameters (``lr``, ``weight_decay``, ``betas``, ...), which go into the param
    group, and engine options (``ENGINE_OPTIONS``), which go to the optimizer's constructor.
    """
    engine = {k: v for k, v in kwargs.items() if k in ENGINE_OPTIONS}
    hyper = {k: v for k, v in kwargs.items() if k not in ENGINE_OPTIONS}
    return AdamsOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs=hyper)],
        optimizer_factory_kwargs_by_name={name: engine},
    )


def build_adams_optimizers(model_parts: list[nn.Module], name: str = "Adams",
                           **kwargs: Any) -> AdamsOptimizersContainer:
    """The container torchtitan's trainer would build from ``adams_config(name, **kwargs)``."""
    container = adams_config(name, **kwargs).build(model_parts=model_parts)
    assert isinstance(container, AdamsOptimizersContainer)
    return container
