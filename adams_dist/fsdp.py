"""Parameters that arrive already sharded: FSDP2 (``fully_shard``) or hand-built DTensors on dim 0.

FSDP2 has already reduce-scattered and averaged the gradients, so the engine only updates each
rank's local rows. Those rows are the same rows the ZeRO layout would give (chunks of dim 0), so
spectral decay runs unchanged: one all-reduce of the partial ``W^T u`` vectors over the mesh.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .layout import Slot
from .spectral import SpectralShape

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a DTensor (a view that in-place updates reach), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def mesh_group(params: list[torch.Tensor]) -> Any | None:
    """The process group of DTensor ``params`` (all on one 1-D mesh, sharded on dim 0); None if none are."""
    dtensors = [p for p in params if isinstance(p, DTensor)]
    if not dtensors:
        return None
    if len(dtensors) != len(params):
        raise ValueError("mix of DTensor and plain parameters: shard every parameter with fully_shard "
                         "(or distribute_tensor), or none")
    mesh = dtensors[0].device_mesh
    for i, p in enumerate(dtensors):
        if p.device_mesh != mesh:
            raise ValueError(f"parameter #{i} lives on a different device mesh; all must share one")
        if mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != Shard(0):
            raise ValueError(f"parameter #{i} has placements {p.placements} on a {mesh.ndim}-D mesh; "
                             "only Shard(0) on a 1-D mesh (FSDP2's layout) is supported")
    return mesh.get_group()


def _dim0_offset(p: Any) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] if offset else 0


def make_slot(p: Any, index: int, group_index: int, spectral_enabled: bool) -> Slot:
    """A slot describing the rows this rank already holds."""
    shape = SpectralShape.of(p) if spectral_enabled else None
    local = p.to_local()
    inner = math.prod(p.shape[1:]) if p.ndim else 1
    offset = _dim0_offset(p)
    if shape is not None:
        row_len, rows = shape.cols, p.numel() // shape.cols
        row_start, local_rows = offset * (inner // shape.cols), local.numel() // shape.cols
    else:
        row_len, rows = 1, p.numel()
        row_start, local_rows = offset * inner, local.numel()
    return Slot(p, index, group_index, shape, row_len, rows, local_rows, row_start=row_start, local_rows=local_rows)


def like_param(p: Any, local_flat: torch.Tensor, per_row: bool) -> DTensor:
    """Wrap this rank's flat state rows as a DTensor laid out like ``p`` (per element, or per row for u)."""
    local = p.to_local()
    if per_row:
        shape, local_shape = p.shape[:-1], local.shape[:-1]
    else:
        shape, local_shape = p.shape, local.shape
    return DTensor.from_local(local_flat.view(local_shape), p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())
