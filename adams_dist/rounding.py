"""float32 values kept in bfloat16 storage: stochastic rounding, or an exact split into bf16 plus a remainder.

Stochastic rounding, reproducible without a generator.

``master_dtype=None`` keeps no float32 master: each step computes in float32 and stores the result
in the bfloat16 parameter, rounded up with probability equal to the dropped fraction (so the stored
value is right on average and small updates are not lost). The random bits come from a hash of
(seed, parameter index, step, element index), where the element index counts over the whole
parameter: a run is reproducible, and the same at every world size, since each element is rounded
by the one rank that owns it, with the same bits.

The remainder (``master_remainder=True``): a float32 master is stored as the bfloat16 parameter plus
the int16 difference of their bit patterns, which puts it back exactly. The parameter is the master
rounded to nearest with ties away from zero; round-to-nearest-even cannot be used, because an even
bfloat16 value has 65537 float32 values rounding to it, one more than 16 bits can tell apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MASK32 = 0xFFFFFFFF
CHUNK = 1 << 16  # elements rounded at a time
# Multipliers below 2**30, so a 32-bit value times one stays inside int64 on every backend.
_MIX = (0x2C1B3C6D, 0x297A2D39, 0x1B873593)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values < 2**32."""
    for k in _MIX:
        x = ((x ^ (x >> 16)) * k) & _MASK32
    return x ^ (x >> 16)


def key(seed: int, index: int, step: int) -> int:
    """The hash key of one parameter at one step."""
    x = torch.tensor([(seed * 1_000_003 + index) & _MASK32, step & _MASK32], dtype=torch.int64)
    return int(_mix(_mix(x[:1]) ^ x[1:]).item())


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, key_: int,
                      index_of: Callable[[int, int, torch.device], torch.Tensor]) -> None:
    """``out`` (bfloat16, flat) <- ``value`` (float32, flat) rounded stochastically; ``index_of(start, n,
    device)`` gives the indices within the whole parameter of ``value[start: start + n]``, so the noise is
    the same at any sharding. Non-finite values are stored as they are."""
    value = value.contiguous()
    for start in range(0, value.numel(), CHUNK):  # the hash's int64 temporaries stay cache-sized
        part = value[start: start + CHUNK]
        index = index_of(start, part.numel(), value.device)
        noise = (_mix(index ^ key_) & 0xFFFF).to(torch.int32)
        # Adding to the bit pattern adds to the magnitude whatever the sign; clearing the low 16 bits then
        # leaves a bfloat16 value: rounded up with probability (dropped bits) / 2**16.
        rounded = ((part.view(torch.int32) + noise) & -65536).view(torch.float32)
        out[start: start + CHUNK].copy_(torch.where(torch.isfinite(part), rounded, part))


def from_first(first: int) -> Callable[[int, int, torch.device], torch.Tensor]:
    """``index_of`` for values that are the parameter's elements ``first, first + 1, ...``."""
    return lambda start, n, device: torch.arange(first + start, first + start + n, dtype=torch.int64, device=device)


def split_(value: torch.Tensor, high: torch.Tensor, remainder: torch.Tensor) -> None:
    """Store float32 ``value`` exactly as bfloat16 ``high`` (rounded to nearest, ties away from zero) plus the
    int16 ``remainder`` of the bit patterns (all flat and of one length)."""
    bits = value.contiguous().view(torch.int32)
    top = (bits + 0x8000) >> 16  # + half a bf16 step to the magnitude, then keep the top 16 bits
    high.view(torch.int16).copy_(top)  # top fits in int16: its low 16 bits are the bf16 pattern
    remainder.copy_(bits - (top << 16))  # in [-2**15, 2**15)


def combine(high: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The float32 values ``split_`` stored (bit for bit)."""
    return ((high.view(torch.int16).to(torch.int32) << 16) + remainder.to(torch.int32)).view(torch.float32)
