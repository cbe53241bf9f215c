"""How the optimizer stores what it updates, and how a step reads and writes it back.

The master: an fp32 copy, the parameters themselves (same dtype), the bf16 parameter plus an int16
remainder (``master_remainder``), or none (``master_dtype=None``: stochastic rounding into the bf16
parameter). The moments: floats, bf16, or 8-bit codes (``quant8.py``). A step always computes in
``compute_dtype`` on wide copies of whatever is stored narrower, then stores the result back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ablations, quant8, rounding, validation
from .decay import NO_DECAY, Decay
from .layout import Slot
from .rules.compiled import COMPILED_MIN_NUMEL

QUANT_BATCH = 1 << 22  # moment_dtype="8bit": elements whose moments are dequantized at once


@dataclass(frozen=True)
class Storage:
    master_dtype: torch.dtype | None  # None: no master copy, the bf16 parameters are rounded stochastically
    compute_dtype: torch.dtype  # what the update computes in
    moment_dtype: torch.dtype | str
    master_remainder: bool  # the fp32 master as the bf16 parameter plus a 16-bit remainder (rounding.split_)
    rounding_seed: int

    @staticmethod
    def of(master_dtype: Any, moment_dtype: Any, master_remainder: Any, rounding_seed: Any, rule: Any) -> Storage:
        """The validated options (``master_dtype`` itself is checked with the other engine options)."""
        compute_dtype = master_dtype or torch.float32
        return Storage(master_dtype, compute_dtype, validation.check_moment_dtype(moment_dtype, compute_dtype, rule),
                       validation.check_master_remainder(master_remainder, master_dtype),
                       validation.check_rounding_seed(rounding_seed))

    @property
    def in_bf16_params(self) -> bool:
        """The master lives in the bf16 parameters (no master, or with the remainder)."""
        return self.master_dtype is None or self.master_remainder

    def dtypes(self, state_names: Sequence[str]) -> dict[str, torch.dtype | None]:
        """Per state entry, the dtype its buffers hold (None: the parameter's own)."""
        dtypes: dict[str, torch.dtype | None] = {"master_param": self.master_dtype}
        if self.master_remainder:  # the master's bf16 part is the parameter's own dtype
            dtypes = {"master_param": None, "master_remainder": torch.int16}
        if isinstance(self.moment_dtype, str):  # "8bit": codes here, their scales added per slot (quant8.py)
            dtypes.update(quant8.CODE_DTYPES)
        else:
            dtypes.update(dict.fromkeys(state_names, self.moment_dtype))
        return dtypes

    def check(self, groups: list[dict[str, Any]], params: list[torch.Tensor]) -> None:
        """Refuse parameters and groups the chosen storage cannot serve."""
        if self.moment_dtype != self.compute_dtype:
            ablations.check_default_layout(groups, f"moment_dtype={self.moment_dtype}")
        for option, on in (("master_dtype=None", self.master_dtype is None),
                           ("master_remainder=True", self.master_remainder)):
            if on:
                validation.check_bf16_params(params, option)
                ablations.check_default_layout(groups, option)

    def wide_master(self, st: dict[str, Any]) -> dict[str, Any]:
        """``st`` with its master in the compute dtype: put together from the bf16 parameter and the
        remainder, or widened from the bf16 parameter (no master); ``st`` itself for a stored master."""
        if self.master_remainder:
            return dict(st, master_param=rounding.combine(st["master_param"], st["master_remainder"]))
        if self.master_dtype is None:
            return dict(st, master_param=st["master_param"].to(self.compute_dtype))
        return st

    def store_masters(self, slots: list[Slot], stored: list[dict[str, Any]], masters: list[torch.Tensor],
                      steps: list[float]) -> None:
        """Write the updated wide masters back into bf16 storage (a no-op for a stored master)."""
        for slot, st, value, t in zip(slots, stored if self.in_bf16_params else (), masters, steps):
            if self.master_remainder:  # exact: the bf16 parameter and the remainder
                rounding.split_(value, st["master_param"], st["master_remainder"])
            else:  # no master: the bf16 parameter, rounded stochastically
                rounding.stochastic_round_(st["master_param"], value,
                                           rounding.key(self.rounding_seed, slot.index, int(t)), slot.global_index)

    def apply_8bit(self, apply: Callable[..., None], names: Sequence[str], states: list[dict[str, Any]],
                   masters: list[torch.Tensor], grads: list[torch.Tensor], steps: list[float],
                   decays: list[Decay], fused: Fused | None = None) -> None:
        """``apply(states, masters, grads, steps, decays)`` on moments dequantized a few parameters at a time
        (the rule is element-wise, so any split of the group gives the same update), quantized back after:
        the step computes in the master's precision, and the extra memory is the float moments of at most
        QUANT_BATCH elements, a parameter larger than that being cut into pieces of whole blocks.
        ``fused`` (the compiled path): a kernel that updates the whole blocks of a big piece from its codes,
        with no float moments in memory; the rest goes through ``apply``."""
        states, masters, grads, steps, decays = _pieces(names, states, masters, grads, steps, decays)
        if fused is not None:
            states, masters, grads, steps, decays = _fused_blocks(fused, names, states, masters, grads, steps, decays)
        per_param = (masters, grads, steps, decays)
        start = 0
        while start < len(states):
            end, numel = start, 0
            while end < len(states) and (end == start or numel + masters[end].numel() <= QUANT_BATCH):
                numel += masters[end].numel()
                end += 1
            part = range(start, end)
            wide = [dict(states[i], **{n: quant8.load(states[i], n, self.compute_dtype) for n in names}) for i in part]
            apply(wide, *([xs[i] for i in part] for xs in per_param))
            for i, w in zip(part, wide):
                for n in names:
                    quant8.store_(w[n], states[i], n)
            del wide, w  # before the next batch's copies exist
            start = end


# (master, grad, state, step, keep) -> whether it ran: the compiled 8-bit update of one piece's whole blocks
Fused = Callable[[torch.Tensor, torch.Tensor, dict[str, Any], float, float], bool]


def _state_piece(st: dict[str, Any], names: Sequence[str], lo: int, hi: int) -> dict[str, Any]:
    """``st`` with the codes of elements ``lo:hi`` (``lo`` on a block boundary) and their blocks' scales."""
    return dict(st, **{k: st[k][lo:hi] for k in names},
                **{quant8.scale_name(k): st[quant8.scale_name(k)][lo // quant8.BLOCK: -(-hi // quant8.BLOCK)]
                   for k in names})


def _pieces(names: Sequence[str], states: list[dict[str, Any]], masters: list[torch.Tensor],
            grads: list[torch.Tensor], steps: list[float], decays: list[Decay]) -> tuple[list[Any], ...]:
    """The parameters, those over QUANT_BATCH elements cut into pieces of whole 8-bit blocks: views of their
    master, gradient, codes and scales. Their decay is applied whole first (a spectral one spans rows)."""
    out: tuple[list[Any], ...] = ([], [], [], [], [])
    for st, master, grad, step, dec in zip(states, masters, grads, steps, decays):
        n = master.numel()
        if n <= QUANT_BATCH:
            for xs, x in zip(out, (st, master, grad, step, dec)):
                xs.append(x)
            continue
        dec.apply_(master)
        for lo in range(0, n, QUANT_BATCH):  # QUANT_BATCH is a multiple of the block size
            hi = min(n, lo + QUANT_BATCH)
            for xs, x in zip(out, (_state_piece(st, names, lo, hi), master[lo:hi], grad[lo:hi], step, NO_DECAY)):
                xs.append(x)
    return out


def _fused_blocks(fused: Fused, names: Sequence[str], states: list[dict[str, Any]], masters: list[torch.Tensor],
                  grads: list[torch.Tensor], steps: list[float], decays: list[Decay]) -> tuple[list[Any], ...]:
    """The whole blocks of each piece of at least COMPILED_MIN_NUMEL elements through ``fused``, its decay
    first (a spectral one eagerly: its rows span blocks). Returns what is left for the eager path: the small
    pieces and the others' partial last blocks; everything, from the piece whose kernel cannot be built on."""
    out: tuple[list[Any], ...] = ([], [], [], [], [])
    ok = True
    for st, master, grad, step, dec in zip(states, masters, grads, steps, decays):
        n = master.numel()
        if ok and n >= COMPILED_MIN_NUMEL:
            if dec.rank1 or dec.columns is not None:
                dec.apply_(master)
                dec = NO_DECAY
            ok = fused(master, grad, st, step, dec.keep)
            if ok:
                whole = n // quant8.BLOCK * quant8.BLOCK
                if whole == n:
                    continue
                st, master, grad = _state_piece(st, names, whole, n), master[whole:], grad[whole:]  # dec: a scalar's
        for xs, x in zip(out, (st, master, grad, step, dec)):
            xs.append(x)
    return out
