"""adams_dist: sharded (ZeRO) Adams and Adam-family optimizers for PyTorch.

One engine runs as a drop-in optimizer in one process (CPU, CUDA, MPS) and, under torchrun,
shards master weights and moments across ranks, averaging gradients internally.
"""

from . import rules
from .amp import GradScaler
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .comm import CollectiveTimeout
from .ddp import ddp_without_allreduce
from .info import info
from .optimizer import ShardedOptimizer
from .optimizers import (
    OPTIMIZERS,
    AdamATan2,
    Adams,
    Adams_ZeRO,
    AdamSRF,
    AdamW,
    HomeAdam,
    HomeAdamEW,
    create_optimizer,
    register_optimizer,
)
from .param_groups import ParamGroups, param_groups
from .runtime import init_distributed
from .sharded_checkpoint import load_sharded_optimizer, save_sharded_optimizer
from .spectral import set_heads
from .version import __version__ as __version__

__all__ = [
    "CollectiveTimeout",
    "GradScaler",
    "OPTIMIZERS",
    "ParamGroups",
    "AdamATan2",
    "AdamSRF",
    "AdamW",
    "CheckpointError",
    "Adams",
    "Adams_ZeRO",
    "HomeAdam",
    "HomeAdamEW",
    "ShardedOptimizer",
    "create_optimizer",
    "ddp_without_allreduce",
    "info",
    "init_distributed",
    "load_checkpoint",
    "load_sharded_optimizer",
    "param_groups",
    "register_optimizer",
    "rules",
    "save_checkpoint",
    "save_sharded_optimizer",
    "set_heads",
]
