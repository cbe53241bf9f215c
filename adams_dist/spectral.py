"""Decoupled spectral weight decay: one power-iteration step per matrix (per head), on row shards.

For W (M x N) and a persistent left vector u the reference computes
``v = normalize(W^T u); w = W v; u <- normalize(w); s = <u, w>; W -= lr*wd*sqrt(M) * s * u v^T``.
Since v does not depend on the scale of u and ``s * u = W v``, the decay is
``lr*wd*sqrt(M) * (W v) v^T`` and u may be stored unnormalised as ``u <- W v``. That makes the
work separable by rows: each rank sums ``W_r^T u_r`` over its rows (one all-reduce for all
matrices), then computes ``w_r = W_r v`` and decays its own rows. No rank ever forms M x N.

Heads that are column blocks of the stored weight (HF GPT-2's ``Conv1D``, weight ``(in, out)``) are
matrices ``A_h = W[:, block h]^T``: their u runs along W's columns and is replicated on every rank,
while v runs along W's rows, which the ranks split. Each rank computes its rows of ``v = A^T u = W u``
unnormalised and sends ``||v_r||^2`` and ``A_r v_r`` in the same all-reduce; ``A v`` is their sum
divided by ``||v||``, so the column layout costs no second reduction either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .tracing import tracing

_HEADS_ATTR = "_adams_dist_heads"
_HEADS_DIM_ATTR = "_adams_dist_heads_dim"


def set_heads(param: torch.Tensor, n_heads: int, dim: int = 0) -> torch.Tensor:
    """Treat a 2-D weight as ``n_heads`` matrices for spectral decay, one per block of ``dim``.

    ``dim=0`` (``nn.Linear``'s ``(out, in)`` layout): a ``(n_heads*M, N)`` weight is ``n_heads`` matrices
    ``(M, N)``. ``dim=1`` (the transposed ``(in, out)`` layout of HF GPT-2's ``Conv1D``): a
    ``(N, n_heads*M)`` weight is ``n_heads`` matrices ``(M, N)``, the transposes of its column blocks,
    exactly as the same layer stored as ``nn.Linear`` with ``dim=0``.
    The parameter keeps its shape; only the optimizer sees the heads. Returns ``param``.
    Call it before creating the optimizer.
    """
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    if dim not in (0, 1) or isinstance(dim, bool):
        raise ValueError(f"dim must be 0 (heads are blocks of rows) or 1 (blocks of columns), got {dim!r}")
    if param.ndim != 2:
        raise ValueError(f"set_heads needs a 2-D weight, got shape {tuple(param.shape)}")
    size, what = param.shape[dim], ("rows", "row") if dim == 0 else ("columns", "column")
    if size % n_heads:
        raise ValueError(f"{size} {what[0]} do not split into {n_heads} heads")
    if size // n_heads < 2:
        raise ValueError(f"each head would have {size // n_heads} {what[1]}; spectral decay needs at least 2")
    setattr(param, _HEADS_ATTR, n_heads)
    setattr(param, _HEADS_DIM_ATTR, dim)
    return param


@dataclass(frozen=True)
class SpectralShape:
    """A parameter seen as ``heads`` matrices of ``rows x cols``: row-major and head-major, or with
    ``columns`` the transposes of the column blocks of a ``(cols, heads*rows)`` weight."""

    heads: int
    rows: int
    cols: int
    columns: bool = False

    @property
    def row_len(self) -> int:
        """Elements per row of the stored weight: the unit the ranks split it by."""
        return self.heads * self.rows if self.columns else self.cols

    @property
    def u_numel(self) -> int:
        """Length of the whole persistent u: one entry per row of every head."""
        return self.heads * self.rows

    @staticmethod
    def of(p: torch.Tensor) -> SpectralShape | None:
        """The spectral view of ``p``, or None when it gets scalar/vector decay instead."""
        if p.ndim < 2 or p.shape[-1] == 1 or p.shape[-2] == 1:
            return None
        if getattr(p, "use_spectral_decay", True) is False:
            return None
        n_heads = getattr(p, _HEADS_ATTR, None)
        if n_heads is not None and p.ndim == 2:
            if getattr(p, _HEADS_DIM_ATTR, 0) == 1:
                return SpectralShape(n_heads, p.shape[1] // n_heads, p.shape[0], columns=True)
            return SpectralShape(n_heads, p.shape[0] // n_heads, p.shape[1])
        return SpectralShape(math.prod(p.shape[:-2]), p.shape[-2], p.shape[-1])


def head_segments(row_start: int, n_rows: int, rows_per_head: int) -> list[tuple[int, int, int, int]]:
    """Split local rows into at most three runs: a partial head, whole heads, a partial head.

    Returns ``(lo, hi, head_lo, head_hi)`` with lo/hi local row indices; each run is viewable as
    ``(head_hi - head_lo, rows, cols)``.
    """
    segments = []
    r, end = row_start, row_start + n_rows
    while r < end:
        head = r // rows_per_head
        if r == head * rows_per_head and end - r >= rows_per_head:
            k = (end - r) // rows_per_head
            segments.append((r - row_start, r - row_start + k * rows_per_head, head, head + k))
            r += k * rows_per_head
        else:
            stop = min(end, (head + 1) * rows_per_head)
            segments.append((r - row_start, stop - row_start, head, head + 1))
            r = stop
    return segments


def _runs(w_rows: torch.Tensor, u_rows: torch.Tensor, row_start: int, shape: SpectralShape):
    for lo, hi, h0, h1 in head_segments(row_start, w_rows.shape[0], shape.rows):
        n = h1 - h0
        yield w_rows[lo:hi].view(n, (hi - lo) // n, w_rows.shape[1]), u_rows[lo:hi].view(n, -1), h0, h1


def partial_wtu(w_rows: torch.Tensor, u_rows: torch.Tensor, row_start: int, shape: SpectralShape,
                out: torch.Tensor) -> None:
    """``out[h] = sum over local rows of head h of u_i * W_i`` (out: heads x cols, zeroed by caller)."""
    for w, u, h0, h1 in _runs(w_rows, u_rows, row_start, shape):
        out[h0:h1] += torch.bmm(u.unsqueeze(1), w).squeeze(1)


def normalize_heads(wtu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows of ``wtu`` and a mask of heads whose power iteration collapsed (zero vector)."""
    norm = torch.linalg.vector_norm(wtu, dim=-1, keepdim=True)
    dead = norm.squeeze(-1) == 0
    return wtu / norm.clamp_min(torch.finfo(wtu.dtype).tiny), dead


PowerRun = tuple[int, int, torch.Tensor, torch.Tensor]  # (lo, hi) local rows, W v (n, r, 1), v^T (n, 1, cols)


def power_rows(w_rows: torch.Tensor, u_rows: torch.Tensor, row_start: int, shape: SpectralShape,
               v: torch.Tensor, dead: torch.Tensor, sigma_sq: torch.Tensor) -> list[PowerRun]:
    """The power step on this rank's rows: ``u_r <- W_r v`` per head, without touching W.

    Returns, per run of rows, the pieces of the rank-1 decay ``W_r -= coef * (W_r v) v^T`` so that
    the caller can apply it (``rank1_``) eagerly or fused into the element-wise update.
    ``sigma_sq[h]`` receives this rank's part of ``||W v||^2``. Heads marked ``dead`` restart from
    a fixed non-constant vector instead of staying at zero forever.
    """
    sigma_sq.zero_()
    v = v.to(w_rows.dtype)
    out = []
    for lo, hi, h0, h1 in head_segments(row_start, w_rows.shape[0], shape.rows):
        w = w_rows[lo:hi].view(h1 - h0, (hi - lo) // (h1 - h0), w_rows.shape[1])
        vt = v[h0:h1].unsqueeze(1)  # (n, 1, cols)
        wv = torch.bmm(w, vt.transpose(1, 2))  # (n, rows, 1)
        sigma_sq[h0:h1] += wv.square().sum(dim=(1, 2)).to(sigma_sq.dtype)
        u_rows[lo:hi].copy_(wv.reshape(-1))
        out.append((lo, hi, wv, vt))
    _restart_dead(u_rows, row_start, shape, dead)  # a select, not an `if`: no wait for the device
    return out


def rank1_(w: torch.Tensor, wv: torch.Tensor, vt: torch.Tensor, coef: float) -> None:
    """``W -= coef * (W v) v^T`` in place on a ``(heads, rows, cols)`` view, with ``wv`` ``(heads, rows, 1)``
    and ``vt`` ``(heads, 1, cols)`` from ``power_rows``: the only implementation of the rank-1 decay.

    Eager, one batched GEMM. While torch.compile traces an update kernel, a broadcast outer product
    instead, which inductor fuses into the update's single pass over memory.
    """
    if tracing():
        w.sub_(wv * vt * coef)
    else:
        w.baddbmm_(wv, vt, alpha=-coef)


def apply_rank1(w_rows: torch.Tensor, runs: list[PowerRun], coef: float) -> None:
    """``W_r -= coef * (W_r v) v^T`` for the runs ``power_rows`` returned."""
    for lo, hi, wv, vt in runs:
        rank1_(w_rows[lo:hi].view(wv.shape[0], -1, w_rows.shape[1]), wv, vt, coef)


def decay_rows(w_rows: torch.Tensor, u_rows: torch.Tensor, row_start: int, shape: SpectralShape,
               v: torch.Tensor, dead: torch.Tensor, coef: float, sigma_sq: torch.Tensor) -> None:
    """``W_r -= coef * (W_r v) v^T`` per head, then ``u_r <- W_r v`` (before the decay)."""
    runs = power_rows(w_rows, u_rows, row_start, shape, v, dead, sigma_sq)
    if coef != 0.0:
        apply_rank1(w_rows, runs, coef)


def products(w_rows: torch.Tensor, row_start: int, shape: SpectralShape, v: torch.Tensor, out: torch.Tensor) -> None:
    """``out = W_r v`` per head over this rank's block (rows from ``row_start``, the columns ``v`` covers):
    its part of ``W v`` where the ranks split the columns too."""
    v = v.to(w_rows.dtype)
    for lo, hi, h0, h1 in head_segments(row_start, w_rows.shape[0], shape.rows):
        w = w_rows[lo:hi].view(h1 - h0, (hi - lo) // (h1 - h0), w_rows.shape[1])
        out[lo:hi].copy_(torch.bmm(w, v[h0:h1].unsqueeze(-1)).reshape(-1))


def power_split(w_rows: torch.Tensor, u: torch.Tensor, row_start: int, shape: SpectralShape, v: torch.Tensor,
                dead: torch.Tensor, wv: torch.Tensor, counts_sigma: bool, sigma_sq: torch.Tensor) -> list[PowerRun]:
    """The power step of a matrix whose rows and columns the ranks split: ``u <- W v`` from ``wv``, the sum
    over ranks of ``products`` (u is whole on every rank), and the rank-1 decay's pieces for this rank's
    block as ``power_rows`` gives them (``v``: its columns of v). ``counts_sigma``: this rank reports ``||W v||^2``."""
    wv = wv.to(w_rows.dtype)
    sigma_sq.copy_(wv.view(shape.heads, -1).square().sum(dim=1) if counts_sigma else torch.zeros_like(sigma_sq))
    v = v.to(w_rows.dtype)
    runs = [(lo, hi, wv[row_start + lo: row_start + hi].view(h1 - h0, -1, 1), v[h0:h1].unsqueeze(1))
            for lo, hi, h0, h1 in head_segments(row_start, w_rows.shape[0], shape.rows)] if w_rows.shape[1] else []
    u.copy_(wv)
    _restart_dead(u, 0, shape, dead)
    return runs


def _column_heads(w_rows: torch.Tensor, shape: SpectralShape) -> torch.Tensor:
    """Local rows of a column-heads weight as ``(local heads, local rows, rows of a head)``: ``A_h^T``'s
    rows (a rank may hold some of the heads, when the ranks split the columns by whole heads)."""
    return w_rows.view(w_rows.shape[0], w_rows.shape[1] // shape.rows, shape.rows).transpose(0, 1)


def partial_columns(w_rows: torch.Tensor, u: torch.Tensor, first_head: int, shape: SpectralShape) -> torch.Tensor:
    """This rank's ``(heads, rows + 1)`` part of the column-heads power step: ``A_r v_r`` and ``||v_r||^2``,
    with ``v_r = A_r^T u`` its rows of v unnormalised (u: the whole replicated vector), for the heads it
    holds from ``first_head`` on; zeros for the others."""
    w = _column_heads(w_rows, shape)
    heads = slice(first_head, first_head + w.shape[0])
    v = torch.bmm(w, u.view(shape.heads, shape.rows, 1)[heads])  # (local heads, local rows, 1)
    av = torch.bmm(v.transpose(1, 2), w).squeeze(1)  # (local heads, rows)
    out = torch.zeros(shape.heads, shape.rows + 1, dtype=w.dtype, device=w.device)
    out[heads] = torch.cat([av, v.square().sum(dim=(1, 2)).unsqueeze(1)], dim=1)
    return out


def power_columns(w_rows: torch.Tensor, u: torch.Tensor, first_head: int, counts_sigma: bool, shape: SpectralShape,
                  summed: torch.Tensor, sigma_sq: torch.Tensor) -> list[PowerRun]:
    """The power step of column heads from ``summed``, the sum over ranks of ``partial_columns``:
    ``u <- A v`` (the same on every rank) and the rank-1 decay's pieces as one run over the local block, in
    ``_column_heads`` view: ``W[:, block] -= coef * v (A v)^T`` is ``A -= coef * (A v) v^T``.
    ``counts_sigma``: this rank reports ``||A v||^2`` (one rank does, the others report 0)."""
    av, norm = summed[:, :-1], summed[:, -1].sqrt()
    scale = 1.0 / norm.clamp_min(torch.finfo(summed.dtype).tiny)
    w = _column_heads(w_rows, shape)
    heads = slice(first_head, first_head + w.shape[0])
    v = torch.bmm(w, u.view(shape.heads, shape.rows, 1)[heads].to(w.dtype)) * scale[heads].view(-1, 1, 1).to(w.dtype)
    av = (av * scale[:, None]).to(w.dtype)
    sigma_sq.copy_(av.square().sum(dim=1) if counts_sigma else torch.zeros_like(sigma_sq))
    u.copy_(av.reshape(-1))
    _restart_dead(u, 0, shape, norm == 0)
    return [(0, w_rows.shape[0], v, av[heads].unsqueeze(1))]


def apply_rank1_columns(w_rows: torch.Tensor, runs: list[PowerRun], coef: float, shape: SpectralShape) -> None:
    """``A -= coef * (A v) v^T`` for the run ``power_columns`` returned."""
    for _, _, v, av in runs:
        rank1_(_column_heads(w_rows, shape), v, av, coef)


def _restart_dead(u_rows: torch.Tensor, row_start: int, shape: SpectralShape, dead: torch.Tensor) -> None:
    restart, head = _restart_rows(row_start, u_rows.shape[0], shape.rows, u_rows.device)
    u_rows.copy_(torch.where(dead[head], restart.to(u_rows.dtype), u_rows))


@functools.lru_cache(maxsize=4096)
def _restart_rows(row_start: int, n_rows: int, rows_per_head: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The restart vector of rows ``row_start:row_start + n_rows`` and the head of each row: made once per
    matrix, not at every step (ten small ops, about 45 us a matrix on one CPU core)."""
    rows = torch.arange(row_start, row_start + n_rows, device=device)
    # 1 + frac(i * golden ratio), in 32-bit fixed point (exact integer math, float64-free for MPS):
    # deterministic in the global row index, so identical at any world size.
    frac = (rows * _GOLDEN_FIXED32) % (1 << 32)
    return 1.0 + frac.to(torch.float32) * 2.0 ** -32, rows // rows_per_head


_GOLDEN_FIXED32 = 2654435769  # round(0.6180339887 * 2**32)
