"""Process-group setup for scripts launched by torchrun (or run as one plain process)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as one plain process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int = 0) -> torch.device:
    """The fastest device this process can use: CUDA (one GPU per local rank), then MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Without WORLD_SIZE in the environment (a plain `python script.py`), no group is created and
    the optimizers run in single-process mode. The backend defaults to NCCL when the process
    has a CUDA device and gloo otherwise.
    """
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", rank))
            return DistInfo(rank, world, local, pick_device(local), dist.get_backend())
        return DistInfo(0, 1, 0, pick_device(0), None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
