"""Parameters that arrive already sharded as DTensors: FSDP2 (``fully_shard``), HSDP, tensor parallelism
(Shard(0) and Shard(1) weights), FSDP+TP, or hand-built ones, placed by Shard and Replicate on any mesh.

FSDP2 (and the TP layers' backward) have already reduced and averaged the gradients, so the engine
only updates each rank's local block. A block of whole rows (chunks of dim 0) is what the ZeRO layout
would give, so spectral decay runs unchanged: one all-reduce of the partial ``W^T u`` vectors over the
mesh. A 2-D weight whose columns are split as well needs a second small all-reduce, of ``W v``.

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
try:  # FSDP2 over tensor parallelism shards dim 0 of a Shard(0) weight again: a strided shard (not a Shard)
    from torch.distributed.tensor.placement_types import _StridedShard
    _PLACED_BY: tuple[type, ...] = (Shard, Replicate, _StridedShard)
except ImportError:  # pragma: no cover - older torch
    _PLACED_BY = (Shard, Replicate)


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a DTensor (a view that in-place updates reach), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_grad(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's part of ``p.grad``, laid out as ``p``'s local part: a gradient placed otherwise (a Partial
    sum from tensor parallelism) is redistributed first, a collective every rank makes for the same params."""
    g = p.grad
    if isinstance(g, DTensor) and isinstance(p, DTensor) and tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return None if g is None else local_tensor(g)


def _mesh_of(params: list[torch.Tensor]) -> Any | None:
    """The device mesh of DTensor ``params`` (all on one mesh, placed by Shard and Replicate); None if none are."""
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
        if not all(isinstance(pl, _PLACED_BY) for pl in p.placements):
            raise ValueError(f"parameter #{i} has placements {p.placements}; only Shard and Replicate placements "
                             "are supported (a Partial parameter is a sum not yet taken)")
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


def _counts(p: Any) -> bool:
    """Whether this rank adds its part of ``p`` to sums over the mesh: along every mesh dim that
    replicates ``p``, the first rank only (the others hold the same values and add zeros)."""
    return all(p.device_mesh.get_local_rank(d) == 0 for d, pl in enumerate(p.placements) if isinstance(pl, Replicate))


def make_slot(p: Any, index: int, group_index: int, spectral_enabled: bool) -> Slot:
    """A slot describing the block of ``p`` this rank already holds.

    Element-wise state needs nothing but the local tensor. Spectral decay needs whole rows of each
    matrix, or, for a 2-D weight whose columns are split too (tensor parallelism's Shard(1)), a block of
    rows and columns: its power step then sums ``W v`` over the ranks as well (``decay.split_products``).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = SpectralShape.of(p) if spectral_enabled else None
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    n_local = math.prod(local_shape)
    block = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
    counts = _counts(p)
    if shape is None:
        return Slot(p, index, group_index, None, 1, p.numel(), n_local, local_rows=n_local, counts=counts,
                    local_block=block)
    split_cols = local_shape[-1] != p.shape[-1]
    # column heads split by columns: each rank must hold whole heads (its heads' matrices are then local)
    torn_heads = split_cols and shape.columns and (offset[-1] % shape.rows or local_shape[-1] % shape.rows)
    if tuple(local_shape[1:-1]) != tuple(p.shape[1:-1]) or (split_cols and p.ndim != 2) or torn_heads:
        raise ValueError(f"parameter #{index} {tuple(p.shape)} with placements {p.placements}: spectral decay "
                         "needs whole rows of each matrix, a 2-D weight split by rows and columns, or column heads "
                         "split by whole heads; set use_spectral_decay = False on it, or shard it on dim 0 or 1")
    if split_cols:
        rows, row_len = p.shape[0], local_shape[1]
        row_start, local_rows, col_start = offset[0], local_shape[0], offset[1]
    else:
        inner = math.prod(p.shape[1:])
        row_len, rows = shape.row_len, p.numel() // shape.row_len
        row_start, local_rows, col_start = offset[0] * (inner // row_len), n_local // row_len, 0
    return Slot(p, index, group_index, shape, row_len, rows, local_rows, row_start=row_start, local_rows=local_rows,
                col_start=col_start, counts=counts, local_block=block)


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
