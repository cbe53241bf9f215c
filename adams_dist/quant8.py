"""``moment_dtype="8bit"``: the rule's moments as 8-bit codes with one float32 scale per block.

A flat tensor of n elements is cut into blocks of ``BLOCK`` consecutive elements (the last may be
short). Each block stores one float32 scale, its absmax, and one byte per element: the index of the
nearest entry of a fixed table of values in [-1, 1]; it reads back as ``table[code] * scale``.

The tables are dynamic (tree) maps, as in 8-bit optimizers (Dettmers 2015; bitsandbytes, torchao): in
a code's magnitude bits, a run of z zero bits picks the decade [10**-(z+1), 10**-z], and the bits
after the first 1 a linear fraction of it; each decade holds half the codes of the one above. Linear
codes (absmax * code / 255) stored everything below absmax/510 as 0, and AdamW's step there grew up to
1/sqrt(1 - beta2) = 32 times too large: it diverged (docs/results.md, "8-bit moments").

- m (``exp_avg``, int8): code in [-127, 127], a sign and 7 bits of magnitude: |m| down to 1e-6 of the
  block's absmax keeps a nonzero code, 64 codes in the top decade;
- v (``exp_avg_sq``, uint8): code in [0, 255], coded in the square-root domain, ``v = (table[code] *
  scale)**2``: sqrt(v) down to 1e-7 of the block's absmax (v down to 1e-14), 128 codes in the top
  decade. The rules read v through sqrt(v) (or v itself, SRF), and the sqrt domain keeps 7 decades of
  sqrt(v) where coding v directly keeps 3.5 (measured against it: docs/results.md).

A code is the magnitude nearest float32(|x| / scale) (on a midpoint, the smaller one), with the sign
of x. The engine counts blocks within each
parameter's rows on this rank, so no block straddles a shard boundary. A NaN makes its block's scale
NaN: the whole block reads back as NaN. The dtype of the codes tells the two formats apart.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BLOCK = 256  # elements per scale: 4 bytes of scale per 256 codes, 1/64 of a byte per element
CODE_DTYPES = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}  # m signed; v unsigned, in the sqrt domain
QMAX = {torch.int8: 127, torch.uint8: 255}  # largest code; code 0 is the value 0
CHUNK = BLOCK * 1024  # elements (whole blocks) quantized in one pass: 256K, so temporaries stay about 1 MB each


def dynamic_map(bits: int) -> list[float]:
    """The 2**bits magnitudes of ``bits`` bits, ascending from 0 to 1: z leading zero bits, then a 1, then
    ``bits - 1 - z`` bits of linear fraction in the decade [10**-(z+1), 10**-z] (its top included)."""
    values = [0.0]
    for z in range(bits - 1, -1, -1):  # smallest decade first
        k = 2 ** (bits - 1 - z)  # fraction steps in this decade
        values += [10.0 ** -z * (0.1 + 0.9 * j / k) for j in range(1, k + 1)]
    return values


def _encoder(mags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest magnitude by two table reads instead of a binary search (torch.bucketize: 30x slower here).
    The top 16 bits of a float32 >= 0 (exponent and 7 mantissa bits) name a bucket at most 1/128 of its
    values wide, narrower than the gap between neighbouring magnitudes, so it holds at most one midpoint:
    ``first[bucket]`` is the nearest magnitude at the bucket's lower edge, and a value above
    ``above[first]``, the midpoint to the next magnitude, takes the next."""
    mids = (mags[1:].double() + mags[:-1].double()) / 2
    edges = (torch.arange(1 << 15, dtype=torch.int32) << 16).view(torch.float32)  # all bucket lower edges
    first = torch.bucketize(edges.double(), mids).to(torch.int32)  # on a midpoint, the lower magnitude
    above = mids.float()
    above = torch.where(above.double() > mids, torch.nextafter(above, torch.zeros(())), above)  # a > above <=> a > mid
    return first, torch.cat([above, torch.tensor([float("inf")])])


MAGS = {torch.int8: torch.tensor(dynamic_map(7)), torch.uint8: torch.tensor(dynamic_map(8))}  # float32
TABLE = {torch.int8: torch.cat([-MAGS[torch.int8].flip(0)[:-1], MAGS[torch.int8]]),  # code c: TABLE[c + 127]
         torch.uint8: MAGS[torch.uint8]}
ENCODER = {dt: _encoder(m) for dt, m in MAGS.items()}


@functools.cache
def tables(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TABLE and ENCODER of the code dtype on ``device``: copied once, not at every chunk."""
    first, above = ENCODER[dtype]
    return TABLE[dtype].to(device), first.to(device), above.to(device)


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def scale_name(name: str) -> str:
    """The state entry holding the scales of the codes in ``name``."""
    return f"{name}_scale"


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` (flat) zero-padded to whole blocks, shaped (blocks, BLOCK)."""
    return F.pad(x, (0, (-x.numel()) % BLOCK)).view(-1, BLOCK)


def quantize_(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Store flat ``x`` into ``codes`` (int8: signed, uint8: sqrt domain) and ``scales`` (float32, one per block)."""
    x = x.reshape(-1)
    for lo in range(0, x.numel(), CHUNK):  # whole blocks at a time: the temporaries stay CHUNK-sized
        _quantize_chunk(x[lo: lo + CHUNK], codes[lo: lo + CHUNK], scales[lo // BLOCK: (lo + CHUNK) // BLOCK])


def _quantize_chunk(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    blocks = torch.empty(n_blocks(x.numel()) * BLOCK, dtype=codes.dtype, device=codes.device)
    encode_blocks_(_blocks(x), blocks.view(-1, BLOCK), scales, *tables(codes.dtype, x.device)[1:])
    codes.copy_(blocks[: x.numel()])


def encode_blocks_(xb: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, first: torch.Tensor,
                   above: torch.Tensor) -> None:
    """Store ``xb`` (``(blocks, BLOCK)`` floats) as ``codes`` of the same shape and one scale per block, with
    the ENCODER tables ``first`` and ``above`` of the codes' dtype. Traceable: the compiled 8-bit kernels
    (rules/compiled.py) fuse it into the update's pass over memory."""
    if codes.dtype == torch.uint8:
        xb = xb.sqrt()
    scales.copy_(xb.abs().amax(dim=1))  # NaN in a block makes its scale NaN: it reads back as NaN
    s = scales.to(xb.dtype)[:, None]  # divide by the stored (float32) scale, so that table * scale is the value read
    y = xb / torch.where(s > 0, s, 1.0)  # in [-1, 1]
    a = y.abs().float()
    bucket = a.view(torch.int32) >> 16  # the top 16 bits; NaN: any bucket, its scale is NaN
    mag = first.index_select(0, bucket.view(-1)).view(bucket.shape)
    mag = mag + (a > above.index_select(0, mag.view(-1)).view(a.shape)).to(mag.dtype)
    if codes.dtype == torch.int8:  # y's sign, as 0 or -1 from its sign bit: two's complement negates mag
        sign = y.float().view(torch.int32) >> 31  # (torch.where: 8x slower eagerly; copysign: a call per vector)
        mag = (mag ^ sign) - sign
    codes.copy_(mag)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat values ``codes`` and ``scales`` stand for, as a new ``dtype`` tensor."""
    codes = codes.reshape(-1)
    table = tables(codes.dtype, codes.device)[0]
    out = torch.empty(codes.numel(), dtype=dtype, device=codes.device)
    for lo in range(0, codes.numel(), CHUNK):
        c, part = codes[lo: lo + CHUNK], out[lo: lo + CHUNK]
        values = decode_blocks(_blocks(c), scales[lo // BLOCK: (lo + CHUNK) // BLOCK], table, dtype)
        part.copy_(values.view(-1)[: c.numel()])
    return out


def decode_blocks(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``(blocks, BLOCK)`` values of ``codes`` (same shape) and their scales, as ``dtype``, with the TABLE of
    the codes' dtype. Traceable, as ``encode_blocks_``."""
    signed = codes.dtype == torch.int8
    values = table.to(dtype).index_select(0, (codes.int() + 127 if signed else codes.int()).view(-1))
    x = values.view(codes.shape) * scales.to(dtype)[:, None]
    return x if signed else x * x


def new_scales(names: tuple[str, ...], numel: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh (zero) scales of the quantized entries ``names`` for ``numel`` local elements."""
    return {scale_name(n): torch.zeros(n_blocks(numel), dtype=torch.float32, device=device) for n in names}


def load(state: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """State entry ``name``, dequantized to ``dtype``."""
    return dequantize(state[name], state[scale_name(name)], dtype)


def store_(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> None:
    """Quantize flat ``x`` into state entry ``name`` and its scales."""
    quantize_(x, state[name], state[scale_name(name)])
