"""Parameters that arrive already sharded: FSDP2 (``fully_shard``) or hand-built DTensors on dim 0.

FSDP2 has already reduce-scattered and averaged the gradients, so the engine only updates each
rank's local rows. Those rows are the same rows the ZeRO layout would give (chunks of dim 0), so
spectral decay runs unchanged: one all-reduce of the partial ``W^T u`` vectors over the mesh.

HSDP (``fully_shard`` on a 2-D ``("replicate", "shard")`` mesh, placements ``(Replicate(), Shard(0))``):
FSDP2 has averaged the gradients over both dims, so every replica holds the same rows and gradients.
The optimizer's collectives span the whole mesh, but only the first replica contributes to the sums
over rows (``W^T u``, the norms): the others add zeros, so each sum is the shard group's, counted once,
and every rank receives the same bits, which keeps the replicas identical.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .layout import Slot
from .spectral import SpectralShape

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, Replicate, Shard  # type: ignore[no-redef]

_LAYOUTS = ((Shard(0),), (Replicate(), Shard(0)))  # FSDP2 on a 1-D mesh; HSDP on a 2-D mesh


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a DTensor (a view that in-place updates reach), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _mesh_of(params: list[torch.Tensor]) -> Any | None:
    """The device mesh of DTensor ``params`` (all on one mesh, in a supported layout); None if none are."""
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
        if tuple(p.placements) not in _LAYOUTS:
            raise ValueError(f"parameter #{i} has placements {p.placements} on a {mesh.ndim}-D mesh; only "
                             "Shard(0) on a 1-D mesh (FSDP2) and (Replicate(), Shard(0)) on a 2-D mesh (HSDP) "
                             "are supported")
    return mesh


def mesh_group(params: list[torch.Tensor]) -> Any | None:
    """The process group of every rank of the DTensor ``params``' mesh; None if they are not DTensors."""
    mesh = _mesh_of(params)
    if mesh is None:
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()  # a 2-D mesh over some of the processes: one group of its ranks


def counts_rows(params: list[torch.Tensor]) -> bool:
    """Whether this rank adds its rows to sums over rows: on a 2-D (HSDP) mesh, the first replica only."""
    mesh = _mesh_of(params)
    return mesh is None or mesh.ndim == 1 or mesh.get_local_rank(0) == 0


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
        row_len, rows = shape.row_len, p.numel() // shape.row_len
        row_start, local_rows = offset * (inner // shape.row_len), local.numel() // shape.row_len
    else:
        row_len, rows = 1, p.numel()
        row_start, local_rows = offset * inner, local.numel()
    return Slot(p, index, group_index, shape, row_len, rows, local_rows, row_start=row_start, local_rows=local_rows)


def like_param(p: Any, local_flat: torch.Tensor, per_row: bool, replicated: bool = False) -> DTensor:
    """Wrap this rank's flat state rows as a DTensor laid out like ``p`` (per element, or per row for u;
    ``replicated``: a u every rank holds whole)."""
    if per_row and replicated:
        return DTensor.from_local(local_flat, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    local = p.to_local()
    if per_row:
        shape, local_shape = p.shape[:-1], local.shape[:-1]
    else:
        shape, local_shape = p.shape, local.shape
    return DTensor.from_local(local_flat.view(local_shape), p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())
