"""``moment_dtype="8bit"``: the rule's moments as 8-bit codes with one float32 scale per block.

A flat tensor of n elements is cut into blocks of ``BLOCK`` consecutive elements (the last may be
short). Each block stores one float32 scale and one byte per element:

- m (``exp_avg``, int8): ``m = code * scale``, code in [-127, 127], scale = absmax(m) / 127;
- v (``exp_avg_sq``, uint8): coded in the square-root domain, ``v = (code * scale)**2``, code in
  [0, 255], scale = absmax(sqrt(v)) / 255. The rules read v through its square root (atan2, AdamW),
  and a block of v spans the square of a gradient's range: the sqrt domain halves the range coded.

Codes are rounded to nearest. The engine counts blocks within each parameter's rows on this rank, so
no block straddles a shard boundary. The dtype of the codes tells the two formats apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 256  # elements per scale: 4 bytes of scale per 256 codes, 1/64 of a byte per element
CODE_DTYPES = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}  # m signed; v unsigned, in the sqrt domain
QMAX = {torch.int8: 127, torch.uint8: 255}
CHUNK = BLOCK * 1024  # elements (whole blocks) quantized in one pass: 256K, so temporaries stay about 1 MB each


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
    qmax = QMAX[codes.dtype]
    xb = _blocks(x)
    if codes.dtype == torch.uint8:
        xb = xb.sqrt()
    scales.copy_(xb.abs().amax(dim=1) / qmax)  # NaN in a block makes its scale NaN: it reads back as NaN
    s = scales.to(x.dtype)[:, None]  # divide by the stored (float32) scale, so that code * scale is the value read
    q = (xb / torch.where(s > 0, s, 1.0)).round_().clamp_(-qmax if codes.dtype == torch.int8 else 0, qmax)
    codes.copy_(q.view(-1)[: x.numel()])


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat values ``codes`` and ``scales`` stand for, as a new ``dtype`` tensor."""
    codes = codes.reshape(-1)
    out = torch.empty(codes.numel(), dtype=dtype, device=codes.device)
    for lo in range(0, codes.numel(), CHUNK):
        c, part = codes[lo: lo + CHUNK], out[lo: lo + CHUNK]
        x = (_blocks(c.to(dtype)) * scales[lo // BLOCK: (lo + CHUNK) // BLOCK].to(dtype)[:, None]).view(-1)
        part.copy_(x[: c.numel()])
        if codes.dtype == torch.uint8:
            part.square_()
    return out


def new_scales(names: tuple[str, ...], numel: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh (zero) scales of the quantized entries ``names`` for ``numel`` local elements."""
    return {scale_name(n): torch.zeros(n_blocks(numel), dtype=torch.float32, device=device) for n in names}


def load(state: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """State entry ``name``, dequantized to ``dtype``."""
    return dequantize(state[name], state[scale_name(name)], dtype)


def store_(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> None:
    """Quantize flat ``x`` into state entry ``name`` and its scales."""
    quantize_(x, state[name], state[scale_name(name)])
