"""Where every parameter's optimizer state lives: row shards packed into flat buckets.

Rank r owns a contiguous block of rows of every parameter. Matrices eligible for spectral decay
are split by rows of their last dim (so each rank holds whole matrix rows, as FSDP2 does); every
other parameter is split element-wise, which balances small and odd-shaped tensors better. Rows
are padded up to a multiple of the world size, and a bucket is laid out as
``[rank-0 section | rank-1 section | ...]`` so that one reduce_scatter / all_gather serves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .spectral import SpectralShape


@dataclass(eq=False)
class Slot:
    """One parameter's place in a bucket and the rows this rank owns."""

    param: torch.Tensor
    index: int  # position over all groups, in order
    group_index: int
    spectral: SpectralShape | None
    row_len: int
    rows: int
    rows_per_rank: int
    offset: int = 0  # element offset of this param inside each rank's section
    row_start: int = 0  # first global row owned by this rank
    local_rows: int = 0  # rows owned by this rank (0 on ranks past the end)
    u_offset: int = 0  # offset of this param's u rows in the bucket's u buffer (spectral only)
    col_start: int = 0  # first global column of this rank's block, when ranks split a matrix's columns too
    counts: bool = True  # adds its part to sums over ranks (False on replicas past the first: they add zeros)
    local_block: tuple[slice, ...] | None = None  # DTensor params: this rank's block of the global tensor

    @property
    def section_numel(self) -> int:
        return self.rows_per_rank * self.row_len

    @property
    def local_numel(self) -> int:
        return self.local_rows * self.row_len

    def rows_shape(self, per_row: bool = False) -> tuple[int, ...]:
        """Shape of this parameter's state in a sharded state dict: (rows, row_len), or (rows,) for
        per-row state (u) and element-wise rows. Rank r holds chunk r of dim 0, as DTensor's Shard(0)."""
        return (self.rows,) if per_row or self.row_len == 1 else (self.rows, self.row_len)

    @property
    def cols_split(self) -> bool:
        """Whether ranks split this matrix's columns as well as its rows (tensor parallelism's Shard(1))."""
        return self.spectral is not None and self.row_len != self.spectral.row_len

    @property
    def u_replicated(self) -> bool:
        """Whether every rank holds the whole u: for column heads u runs along the dim no rank splits, and
        where the columns are split every rank needs all of ``W v``."""
        return self.spectral is not None and (self.spectral.columns or self.cols_split)

    @property
    def u_local(self) -> int:
        """Length of this rank's u: its rows, or the whole u where it is replicated."""
        return self.spectral.u_numel if self.u_replicated and self.spectral else self.local_rows

    @property
    def u_per_rank(self) -> int:
        """u entries in each rank's section of a bucket (padded like the rows)."""
        return self.spectral.u_numel if self.u_replicated and self.spectral else self.rows_per_rank

    def u_shape(self, sharded: bool) -> tuple[int, ...]:
        """Shape of the whole u in a state dict: per row of the weight (as ``rows_shape``), or per head row
        where it is replicated."""
        if self.u_replicated and self.spectral:
            return (self.spectral.u_numel,)
        return self.rows_shape(per_row=True) if sharded else tuple(self.param.shape[:-1])

    def global_index(self, start: int, n: int, device: torch.device) -> torch.Tensor:
        """Flat indices within the whole parameter of this rank's local elements ``start .. start + n``."""
        block = self.local_block
        if not block or all(b.stop - b.start == size for b, size in zip(block[1:], self.param.shape[1:])):
            first = self.local_range[0] if not block else block[0].start * math.prod(self.param.shape[1:])
            return torch.arange(first + start, first + start + n, dtype=torch.int64, device=device)
        # a block split inside (tensor parallelism): unravel local positions, offset them, ravel globally
        local = torch.arange(start, start + n, dtype=torch.int64, device=device)
        index = torch.zeros_like(local)
        stride = 1
        for b, size in zip(reversed(block), reversed(self.param.shape)):
            local, coord = local.div(b.stop - b.start, rounding_mode="floor"), local % (b.stop - b.start)
            index += (coord + b.start) * stride
            stride *= size
        return index

    @property
    def local_range(self) -> tuple[int, int]:
        """Element range of this rank's rows inside the flattened parameter."""
        start = self.row_start * self.row_len
        return start, start + self.local_numel


@dataclass(eq=False)
class Bucket:
    """Parameters of one dtype and device that travel together (groups may mix)."""

    dtype: torch.dtype
    device: torch.device
    slots: list[Slot] = field(default_factory=list)
    section_numel: int = 0  # elements per rank, padding included
    u_numel: int = 0  # u rows per rank over the bucket's spectral slots


def make_slot(p: torch.Tensor, index: int, group_index: int, world_size: int, rank: int,
              spectral_enabled: bool = True) -> Slot:
    shape = SpectralShape.of(p) if spectral_enabled else None
    if shape is not None:
        row_len = shape.row_len
        rows = p.numel() // row_len
    else:
        row_len, rows = 1, p.numel()
    rows_per_rank = math.ceil(rows / world_size) if rows else 0
    row_start = min(rank * rows_per_rank, rows)
    local_rows = max(0, min(rows_per_rank, rows - row_start))
    return Slot(p, index, group_index, shape, row_len, rows, rows_per_rank,
                row_start=row_start, local_rows=local_rows)


def pack_buckets(slots: list[Slot], bucket_bytes: int, world_size: int, min_elem_bytes: int = 1) -> list[Bucket]:
    """Greedily pack slots (in the given order) into buckets of at most ``bucket_bytes`` in total,
    counting each element as at least ``min_elem_bytes`` (the gradient staging dtype's size)."""
    buckets: list[Bucket] = []
    current: dict[tuple[torch.dtype, torch.device], Bucket] = {}
    for slot in slots:
        p = slot.param
        key = (p.dtype, p.device)
        bucket = current.get(key)
        elem = max(p.element_size(), min_elem_bytes)
        size = slot.section_numel * world_size * elem
        used = bucket.section_numel * world_size * elem if bucket else 0
        if bucket is None or (bucket.slots and used + size > bucket_bytes):
            bucket = Bucket(p.dtype, p.device)
            buckets.append(bucket)
            current[key] = bucket
        slot.offset = bucket.section_numel
        bucket.section_numel += slot.section_numel
        if slot.spectral is not None:
            slot.u_offset = bucket.u_numel
            bucket.u_numel += slot.u_per_rank
        bucket.slots.append(slot)
    return buckets


def scatter_rows(flat_param: torch.Tensor, bucket_flat: torch.Tensor, slot: Slot, world_size: int) -> None:
    """Copy a whole flattened parameter into its place in every rank's section of a bucket."""
    sections = bucket_flat.view(world_size, -1)[:, slot.offset: slot.offset + slot.section_numel]
    full, rest = divmod(slot.rows, slot.rows_per_rank) if slot.rows_per_rank else (0, 0)
    n_full = full * slot.section_numel
    if full:
        sections[:full].copy_(flat_param[:n_full].view(full, -1))
    if rest:
        sections[full, : rest * slot.row_len].copy_(flat_param[n_full:])


def gather_rows(bucket_flat: torch.Tensor, slot: Slot, world_size: int, out: torch.Tensor) -> None:
    """Inverse of scatter_rows: read a parameter's rows from every rank's section into ``out`` (flat)."""
    sections = bucket_flat.view(world_size, -1)[:, slot.offset: slot.offset + slot.section_numel]
    full, rest = divmod(slot.rows, slot.rows_per_rank) if slot.rows_per_rank else (0, 0)
    n_full = full * slot.section_numel
    if full:
        out[:n_full].view(full, -1).copy_(sections[:full])
    if rest:
        out[n_full:].copy_(sections[full, : rest * slot.row_len])
