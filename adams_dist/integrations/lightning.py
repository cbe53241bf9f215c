"""Lightning: a DDP strategy whose DistributedDataParallel wrapper leaves the gradients to adams_dist.

An adams_dist optimizer in distributed mode averages the gradients itself (reduce-scatter) and
all-gathers the parameters, so DDP's gradient all-reduce would only double the traffic.
:class:`AdamsDDPStrategy` is Lightning's ``DDPStrategy`` with that all-reduce turned off.

Importing this module imports ``lightning``; ``import adams_dist`` never does.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from adams_dist.ddp import ddp_without_allreduce

__all__ = ["AdamsDDPStrategy"]


class AdamsDDPStrategy(DDPStrategy):
    """``DDPStrategy`` for an adams_dist optimizer: DDP keeps each rank's gradients local.

    Takes DDPStrategy's arguments except the comm-hook ones: the strategy installs its own hook.
    Checkpoints need nothing extra: Lightning calls ``consolidate_state_dict()`` on every rank and
    ``state_dict()`` on rank 0, and ``load_state_dict`` with the full dict on every rank.
    """

    def __init__(self, **kwargs: Any) -> None:
        taken = sorted(k for k in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")
                       if kwargs.get(k) is not None)
        if taken:
            raise ValueError(f"AdamsDDPStrategy installs its own DDP comm hook and does no model averaging; "
                             f"drop {', '.join(taken)}")
        super().__init__(**kwargs)

    def configure_ddp(self) -> None:
        super().configure_ddp()
        # Here, not through ddp_comm_hook=: Lightning registers that one on CUDA only.
        assert isinstance(self.model, DistributedDataParallel)
        ddp_without_allreduce(self.model)
