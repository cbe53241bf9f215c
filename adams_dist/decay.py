"""Decoupled weight decay, planned per tensor before its update.

Scalar decay is ``p <- keep * p``. Spectral decay is the rank-1 ``W -= coef * (W v) v^T`` whose
pieces come from one power step on this rank's rows (``spectral.power_rows``). Rules with a
compiled kernel fold a Decay into their single pass over memory; every other path calls ``apply_``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import spectral
from .layout import Slot


@dataclass
class Decay:
    """Decoupled weight decay of one tensor, due before its update.

    ``p <- keep * p`` (scalar decay), then ``W -= coef * (W v) v^T`` over the row runs that
    ``spectral.power_rows`` returned (spectral decay; ``cols`` is the stored rows' length). Rules with a
    compiled kernel fold it into their single pass over memory; every other path applies it first, as
    does everyone for column heads (``columns``: their shape), whose views are strided.
    """

    keep: float = 1.0
    coef: float = 0.0
    cols: int = 0
    runs: list[spectral.PowerRun] = field(default_factory=list)
    columns: spectral.SpectralShape | None = None

    @property
    def rank1(self) -> bool:
        return self.coef != 0.0 and bool(self.runs)

    def apply_(self, p: torch.Tensor) -> None:
        if self.keep != 1.0:
            p.mul_(self.keep)
        if self.rank1 and self.columns is not None:
            spectral.apply_rank1_columns(p.view(-1, self.cols), self.runs, self.coef, self.columns)
        elif self.rank1:
            spectral.apply_rank1(p.view(-1, self.cols), self.runs, self.coef)


NO_DECAY = Decay()


def wtu_partial(slot: Slot, state: dict[str, Any]) -> torch.Tensor:
    """This rank's ``(heads, cols)`` part of ``W^T u`` over its block of one matrix, in fp32 (for column
    heads ``spectral.partial_columns``); zeros on a replica past the first, whose block another rank counts
    (zeros, not ``t * 0``, which an inf would turn into NaN)."""
    shape = slot.spectral
    assert shape is not None
    rows = state["master_param"].view(slot.local_rows, slot.row_len)  # explicit: a block may have no columns
    if shape.columns:
        out = spectral.partial_columns(rows.float(), state["u"].float(), slot.col_start // shape.rows, shape)
    else:
        out = torch.zeros(shape.heads, shape.cols, dtype=torch.float32, device=rows.device)
        u = state["u"][slot.row_start: slot.row_start + slot.local_rows] if slot.cols_split else state["u"]
        spectral.partial_wtu(rows.float(), u.float(), slot.row_start, shape,
                             out[:, slot.col_start: slot.col_start + slot.row_len])
    return out if slot.counts else torch.zeros_like(out)


def split_products(slots: list[Slot], master_of: Callable[[Slot], torch.Tensor], wtu: dict[int, torch.Tensor],
                   shards: Any) -> dict[int, torch.Tensor]:
    """The second half of the power step for matrices whose columns the ranks split: every rank holds part
    of each row's ``W v``. One all-reduce of these u-sized vectors sums them for all such matrices."""
    split = [s for s in slots if s.cols_split and s.index in wtu and s.spectral and not s.spectral.columns]
    if not split:
        return {}
    parts = []
    for slot in split:
        shape, x = slot.spectral, wtu[slot.index]
        assert shape is not None
        part = torch.zeros(shape.u_numel, dtype=torch.float32, device=x.device)
        if slot.counts:
            v, _ = spectral.normalize_heads(x)
            spectral.products(master_of(slot).view(slot.local_rows, slot.row_len).float(), slot.row_start, shape,
                              v[:, slot.col_start: slot.col_start + slot.row_len],
                              part[slot.row_start: slot.row_start + slot.local_rows])
        parts.append(part)
    flat = torch.cat(parts)
    shards.all_reduce(flat, "the all-reduce of W v for matrices split by columns").wait()
    return dict(zip((s.index for s in split), flat.split([len(p) for p in parts])))


def plan(slot: Slot, state: dict[str, Any], group: dict[str, Any], lr: float, spectral_rule: bool,
         wtu: torch.Tensor | None, wv: torch.Tensor | None = None) -> Decay:
    """This step's decoupled decay of one parameter. With spectral decay its power step (``u <- W v``)
    runs here, from ``wtu``: the sum over all ranks of ``wtu_partial`` (and ``wv``, that of
    ``split_products``, where the ranks split the matrix's columns).

    ``spectral_rule``: Adams (spectral decay on matrices, ``scalar_vector_weight_decay`` on the rest);
    otherwise every parameter gets ``p *= 1 - lr * weight_decay``.
    """
    if not spectral_rule:
        return Decay(keep=1.0 - lr * float(group.get("weight_decay", 0.0)))
    if slot.spectral is None:
        return Decay(keep=1.0 - lr * float(group["scalar_vector_weight_decay"]))
    wd = float(group["weight_decay"])
    if wd == 0.0 or wtu is None:  # spectral decay off for the group: no power iteration either
        return NO_DECAY
    shape, rows = slot.spectral, state["master_param"].view(slot.local_rows, slot.row_len)
    # the rank (and its replicas) that reports ||W v||^2 where every rank computes it whole
    first = slot.row_start == 0 and slot.col_start == 0 and slot.local_numel > 0
    if shape.columns:
        runs = spectral.power_columns(rows, state["u"], slot.col_start // shape.rows, first, shape, wtu,
                                      state["sigma_sq"])
    elif slot.cols_split:
        assert wv is not None
        v, dead = spectral.normalize_heads(wtu)
        runs = spectral.power_split(rows, state["u"], slot.row_start, shape,
                                    v[:, slot.col_start: slot.col_start + slot.row_len], dead, wv, first,
                                    state["sigma_sq"])
    else:
        v, dead = spectral.normalize_heads(wtu)
        runs = spectral.power_rows(rows, state["u"], slot.row_start, shape, v, dead, state["sigma_sq"])
    return Decay(coef=lr * wd * math.sqrt(shape.rows), cols=slot.row_len, runs=runs,
                 columns=shape if shape.columns else None)


def sigmas(slots: list[Slot], state: dict[Any, dict[str, Any]], shards: Any) -> dict[torch.Tensor, torch.Tensor]:
    """Per matrix, the latest spectral-norm estimate per head: ``||W v||`` summed over the ranks' rows."""
    slots = [s for s in slots if s.spectral is not None]
    if not slots:
        return {}
    sq = torch.cat([state[s.param]["sigma_sq"] if s.counts else torch.zeros_like(state[s.param]["sigma_sq"])
                    for s in slots])
    shards.all_reduce(sq, "the all-reduce of spectral norms", side=True).wait()
    heads = [s.spectral.heads for s in slots if s.spectral is not None]
    return {s.param: part.sqrt() for s, part in zip(slots, sq.split(heads))}
