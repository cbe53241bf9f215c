"""Hugging Face ``transformers.Trainer`` with an adams_dist optimizer.

Trainer wraps the model in DistributedDataParallel, clips the local gradients, and saves the whole
optimizer state from rank 0. With a sharded optimizer each of those is wrong or wasteful, so
:class:`AdamsTrainer` changes exactly three things:

- DDP's gradient all-reduce is turned off (the optimizer averages the gradients itself, once);
- ``max_grad_norm`` clips by the true global norm, through the optimizer;
- checkpoints hold the optimizer state sharded (``torch.distributed.checkpoint``): no rank builds
  the whole state, and a run resumes at any world size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch.nn.parallel import DistributedDataParallel

from .. import ddp
from ..optimizer import ShardedOptimizer
from ..sharded_checkpoint import load_sharded_optimizer, save_sharded_optimizer

OPTIMIZER_DIR = "adams_optimizer"  # the sharded optimizer state, inside Trainer's checkpoint-<step> folder


def unwrap(optimizer: Any) -> ShardedOptimizer:
    """The adams_dist optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, ShardedOptimizer):
        raise TypeError(f"AdamsTrainer needs an adams_dist optimizer in optimizers=(optimizer, scheduler), got "
                        f"{type(inner).__name__}")
    return inner


class _TurnOffDDPAllReduce(transformers.TrainerCallback):
    """At the start of training, after Trainer has wrapped the model in DDP and before any backward."""

    def __init__(self, trainer: AdamsTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if isinstance(self.trainer.model_wrapped, DistributedDataParallel):
            ddp.ddp_without_allreduce(self.trainer.model_wrapped)


class AdamsTrainer(transformers.Trainer):
    """``transformers.Trainer`` for ``optimizers=(adams_dist optimizer, scheduler or None)``; see the module."""

    def __init__(self, *args: Any, **kwargs: Any):
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        if optimizer is None:
            raise ValueError("AdamsTrainer needs optimizers=(adams_dist optimizer, scheduler or None)")
        unwrap(optimizer)
        super().__init__(*args, **kwargs)
        self.add_callback(_TurnOffDDPAllReduce(self))

    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        # Without DDP's all-reduce each rank holds its own gradients: only the optimizer knows the global norm.
        self.accelerator.unscale_gradients()  # fp16 loss scaling: clip unscaled gradients (else a no-op)
        return unwrap(self.optimizer).clip_grad_norm_(self.args.max_grad_norm)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        save_sharded_optimizer(os.path.join(output_dir, OPTIMIZER_DIR), unwrap(self.optimizer))  # every rank
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, transformers.trainer.SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not os.path.isdir(os.path.join(checkpoint, OPTIMIZER_DIR)):  # a plain Trainer's optimizer.pt
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        load_sharded_optimizer(os.path.join(checkpoint, OPTIMIZER_DIR), unwrap(self.optimizer))
        scheduler = os.path.join(checkpoint, transformers.trainer.SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
