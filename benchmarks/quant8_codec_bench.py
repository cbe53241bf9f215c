"""The fused 8-bit kernel with its table reads against an exact arithmetic codec: the time of one call, CPU.

    python benchmarks/quant8_codec_bench.py [--numel 4194304] [--repeats 7]

The engine's 8-bit kernel (``rules.compiled.compiled_8bit_kernel``, AdamW rule) reads the code tables of
quant8.py with per-element indirect loads, which inductor writes as scalar loops. The alternative here
computes the same numbers with vector arithmetic: a code's magnitude ``10**-z * (0.1 + 0.9 * j / k)`` from
the code's decade, found by compares and selected by one-hot sums (one nonzero term, so the sums are exact),
in float64 as ``quant8.dynamic_map`` computes it; the nearest code from compares against the decade
thresholds, a linear estimate within the decade and one exact comparison with the midpoint above it.

Before timing, the script checks the arithmetic codec against the tables: all codes (decode) and every
float32 within 3 ulps of each magnitude and midpoint plus 3M random magnitudes (encode), eagerly and
compiled; then the kernels' outputs against the engine's kernel. Variants:

- "table": the engine's kernel;
- "table, select sign": the int8 sign put on by a select instead of two bit casts;
- "arithmetic decode": arithmetic decode, table encode (the engine's one-loop build options);
- "arithmetic": decode and encode arithmetic, with inductor's default realization (under the engine's
  one-loop options inductor re-inlines the encoder's shared subexpressions per use, and the build did
  not finish in 20 minutes).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import interleaved, machine, table

from adams_dist import quant8
from adams_dist.rules import compiled
from adams_dist.rules.compiled import compiled_8bit_kernel, one_graph_per_shape_kind, without_bases
from adams_dist.rules.library import adamw_rule

BITS = {torch.int8: 7, torch.uint8: 8}  # magnitude bits of each code dtype
THRESHOLDS = {BITS[dt]: [float(quant8.ENCODER[dt][1][2 ** p - 1]) for p in range(BITS[dt])] for dt in BITS}


def _decade_sums(ge: list[torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``10**-z``, ``1/k`` and ``k`` of each element's decade p (``ge[i]``: 1.0 where p >= i), as sums with
    one nonzero term: exact."""
    sums = []
    for value in (lambda p: 10.0 ** -(bits - 1 - p), lambda p: 2.0 ** -p, lambda p: 2.0 ** p):
        terms = [(ge[p] - ge[p + 1] if p + 1 < bits else ge[p]) * value(p) for p in range(bits)]
        sums.append(sum(terms[1:], terms[0]))
    return sums[0], sums[1], sums[2]


def _magnitude(j: torch.Tensor, decade: torch.Tensor, inv_k: torch.Tensor) -> torch.Tensor:
    return (decade * (0.1 + (0.9 * j) * inv_k)).float()  # dynamic_map's double arithmetic, in its order


def decode_magnitude(c: torch.Tensor, bits: int) -> torch.Tensor:
    decade, inv_k, k = _decade_sums([(c >= 2 ** p).double() for p in range(bits)], bits)
    return _magnitude(c.double() - k + 1, decade, inv_k)


def encode_magnitude(a: torch.Tensor, bits: int) -> torch.Tensor:
    limits = THRESHOLDS[bits]
    a = torch.where(a > limits[0], a, 0.0)  # NaN and what rounds to code 0 -> 0: the estimate stays finite
    ge = [(a > limits[p]).double() for p in range(bits)]
    decade, inv_k, k = _decade_sums(ge, bits)
    none = 1 - ge[0]
    t = (a / (decade + none).float() - 0.1) * (k.float() / 0.9)  # the position in the decade, about j
    j = torch.minimum(torch.maximum(t.floor(), torch.ones_like(t)), (k + none).float()).double()
    lo, hi = _magnitude(j, decade, inv_k), _magnitude(j + 1, decade, inv_k)
    up = (a.double() > (lo.double() + hi.double()) / 2) & (j < k)
    return (k - 1 + j).int() + up.int()


def decode_blocks(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    c = codes.int()
    x = decode_magnitude(c.abs(), BITS[codes.dtype]).to(dtype) * scales.to(dtype)[:, None]
    return torch.where(c < 0, -x, x) if codes.dtype == torch.int8 else x * x


def encode_blocks_(xb: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, tables: tuple | None) -> None:
    """quant8.encode_blocks_ with the sign by a select, the magnitude by the tables or (None) arithmetic."""
    if codes.dtype == torch.uint8:
        xb = xb.sqrt()
    scales.copy_(xb.abs().amax(dim=1))
    s = scales.to(xb.dtype)[:, None]
    y = xb / torch.where(s > 0, s, 1.0)
    a = y.abs().float()
    if tables is None:
        mag = encode_magnitude(a, BITS[codes.dtype])
    else:
        first, above = tables
        mag = first.index_select(0, (a.view(torch.int32) >> 16).view(-1)).view(a.shape)
        mag = mag + (a > above.index_select(0, mag.view(-1)).view(a.shape)).to(mag.dtype)
    codes.copy_(torch.where(y < 0, -mag, mag) if codes.dtype == torch.int8 else mag)


def variant(decode_arith: bool, encode_arith: bool):  # type: ignore[no-untyped-def]
    def kernel(p, g, codes, scales, tables, keep, update) -> None:  # type: ignore[no-untyped-def]
        state = [decode_blocks(c, s, p.dtype) if decode_arith else quant8.decode_blocks(c, s, t[0], p.dtype)
                 for c, s, t in zip(codes, scales, tables)]
        p.mul_(keep).add_(update(g, *state))
        for x, c, s, t in zip(state, codes, scales, tables):
            encode_blocks_(x, c, s, None if encode_arith else t[1:])
    default_realize = {"realize_opcount_threshold": None, "realize_cpu_opcount_threshold": 50,  # inductor's own
                       "realize_reads_threshold": 4, "realize_acc_reads_threshold": None,
                       "realize_cpu_acc_reads_threshold": 12}
    return compiled._compile(kernel, f"variant_{decode_arith}_{encode_arith}", assert_indirect_indexing=False,
                             **(default_realize if encode_arith else {}))


def check_codec() -> None:
    torch._dynamo.config.cache_size_limit = 64
    for dt, bits in BITS.items():
        mags = quant8.MAGS[dt]
        codes = torch.arange(2 ** bits, dtype=torch.int32)
        mids = ((mags[1:].double() + mags[:-1].double()) / 2).float()
        near = [torch.cat([mags, mids])]
        for toward in (2.0, -1.0):
            x = near[0]
            for _ in range(3):
                x = torch.nextafter(x, torch.full_like(x, toward))
                near.append(x)
        g = torch.Generator().manual_seed(0)
        a = torch.cat([*near, 10 ** (-9 * torch.rand(2_000_000, generator=g)), torch.rand(1_000_000, generator=g),
                       torch.tensor([0.0, 1.0, 1e-30, 1e-45])]).clamp(0, 1)
        first, above = quant8.ENCODER[dt]
        want = first[a.view(torch.int32) >> 16]
        want = want + (a > above[want]).int()
        for how, dec, enc in (("eager", decode_magnitude, encode_magnitude),
                              ("compiled", torch.compile(decode_magnitude), torch.compile(encode_magnitude))):
            assert torch.equal(dec(codes, bits), mags), f"{dt} decode, {how}"
            assert torch.equal(enc(a, bits), want), f"{dt} encode, {how}"
    print(f"arithmetic codec = the tables: all codes, {a.numel()} magnitudes per code dtype, eager and compiled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine())
    check_codec()
    n = args.numel // quant8.BLOCK * quant8.BLOCK
    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    codes0 = (torch.zeros(n, dtype=torch.int8), torch.zeros(n, dtype=torch.uint8))
    scales0 = tuple(torch.zeros(n // quant8.BLOCK) for _ in codes0)
    quant8.quantize_(torch.randn(n, generator=g) * 0.1, codes0[0], scales0[0])
    quant8.quantize_(torch.rand(n, generator=g) * 0.01, codes0[1], scales0[1])
    update = adamw_rule(lr=1e-3, step=3.0, betas=(0.9, 0.95), eps=1e-8)
    kernels = {"table": compiled_8bit_kernel("bench", adamw_rule), "table, select sign": variant(False, False),
               "arithmetic decode": variant(True, False), "arithmetic": variant(True, True)}
    calls, builds, outputs = {}, {}, {}
    for name, kernel in kernels.items():
        state = (p.clone(), tuple(c.clone() for c in codes0), tuple(s.clone() for s in scales0))
        blocks = lambda t: t.view(-1, quant8.BLOCK)  # noqa: E731
        call_args = without_bases((blocks(state[0]), blocks(grad), tuple(map(blocks, state[1])), state[2],
                                   tuple(quant8.tables(c.dtype, p.device) for c in codes0), 0.999, update))
        start = time.perf_counter()
        with one_graph_per_shape_kind():
            kernel(*call_args)  # the build, and the call whose results are compared
        builds[name] = time.perf_counter() - start
        outputs[name] = [state[0].clone(), *(c.clone() for c in state[1])]
        calls[name] = lambda k=kernel, a=call_args: k(*a)
    times = interleaved(calls, args.repeats)
    rows = [[name, f"{1e3 * times[name]:.1f}", f"{times[name] / times['table']:.2f}x", f"{builds[name]:.0f}",
             "yes" if all(torch.equal(x, y) for x, y in zip(outputs[name], outputs["table"])) else "no"]
            for name in kernels]
    print(f"{n} elements, AdamW rule, 1 thread")
    print(table(["8-bit kernel", "ms/call", "vs table", "build s", "same p and codes as table"], rows))


if __name__ == "__main__":
    main()
