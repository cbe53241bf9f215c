"""adams_dist/quant8.py against the float64 model of the format (tests/reference64.py: quantized64)."""

from __future__ import annotations

import pytest
import torch

import adams_dist
from adams_dist import quant8

try:
    from tests.reference64 import codes64, dynamic_table64, quantized64
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference64 import codes64, dynamic_table64, quantized64

B = quant8.BLOCK


def _roundtrip(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = {name: torch.zeros(x.numel(), dtype=quant8.CODE_DTYPES[name]),
             **quant8.new_scales((name,), x.numel(), x.device)}
    quant8.store_(x, state, name)
    return quant8.load(state, name, x.dtype), state[name], state[quant8.scale_name(name)]


def _half_step(y: torch.Tensor, bits: int) -> torch.Tensor:
    """From the format's definition: half the spacing of the codes around |y| (in units of the block scale).
    Decade z, (10**-(z+1), 10**-z], holds 2**(bits-1-z) evenly spaced codes; below 10**-(bits-1) the
    neighbours are 0 and 10**-(bits-1)."""
    z = (-torch.log10(y.abs().clamp_min(1e-30))).floor().clamp(0, bits - 1)
    half = 0.45 * 10.0 ** -z / 2.0 ** (bits - 1 - z)
    return torch.where(y.abs() < 10.0 ** -(bits - 1), torch.full_like(y, 0.5 * 10.0 ** -(bits - 1)), half)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 3 * B + 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roundtrip_matches_the_float64_model_and_its_error_bounds(n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n)
    # magnitudes over eight decades, so blocks hold values far below their absmax, into the finest codes
    m = (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** torch.empty(n, dtype=torch.float64).uniform_(
        -8, 0, generator=g)).to(dtype)
    v = m.square()
    for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        got, codes, scales = _roundtrip(x, name)
        assert codes.dtype == quant8.CODE_DTYPES[name] and scales.numel() == -(-n // B)
        want_codes, want_scales = codes64(x, signed)
        assert torch.equal(scales.double(), want_scales)
        table = dynamic_table64(signed)
        off = 127 if signed else 0
        for lo in range(0, n, B):
            blk = x[lo: lo + B].double()
            y = (blk if signed else blk.sqrt()) / float(scales[lo // B])  # in [-1, 1]
            # the code: the model's nearest entry, but where y sits on a midpoint to float32 rounding
            c, w = codes[lo: lo + B].long() + off, want_codes[lo: lo + B] + off
            tie = ((y - table[c]).abs() - (y - table[w]).abs()).abs() <= 1e-6  # (the code is chosen in float32)
            assert bool(((c == w) | tie).all()), f"block at {lo}: codes off the model away from a tie"
            # the value: within half a code step of the decade y lies in (sqrt domain for v)
            got_y = (got[lo: lo + B].double() if signed else got[lo: lo + B].double().sqrt()) / float(scales[lo // B])
            assert bool(((got_y - y).abs() <= _half_step(y, 7 if signed else 8) * (1 + 1e-5) + 1e-7).all())
            assert signed or bool((got[lo: lo + B] >= 0).all())
        # where the codes agree, the model's value: to float32 rounding, or exactly when computing in float64
        same = codes.long() == want_codes
        assert int((~same).sum()) <= max(1, n // 1000)
        torch.testing.assert_close(got.double()[same], quantized64(x, signed)[same],
                                   rtol=1e-6 if dtype == torch.float32 else 0, atol=0)


def test_the_tables_are_the_dynamic_maps() -> None:
    for dt, signed in ((torch.int8, True), (torch.uint8, False)):
        assert torch.equal(quant8.TABLE[dt].double(), dynamic_table64(signed))
        assert quant8.TABLE[dt].numel() == (255 if signed else 256)


def test_codes_at_and_next_to_every_midpoint_are_the_nearest() -> None:
    """On each midpoint between neighbouring codes (as float32, and the float32 values either side of it),
    the code is the nearest in exact arithmetic, a tie taking the smaller magnitude: random data almost
    never lands there."""
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        mags = dynamic_table64(signed)[127:] if signed else dynamic_table64(signed)
        mid = ((mags[1:] + mags[:-1]) / 2).float()
        y = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-1.0))])
        y = torch.cat([y, -y]) if signed else y
        x = y.double() if signed else y.double().square()  # (float64: sqrt gives y back exactly)
        rows = torch.nn.functional.pad(x, (0, (-x.numel()) % (B - 1))).view(-1, B - 1)
        blocks = torch.cat([torch.ones(rows.shape[0], 1, dtype=x.dtype), rows], dim=1).view(-1)  # scale 1: y exact
        _, codes, scales = _roundtrip(blocks, name)
        assert bool((scales == 1).all())
        want, _ = codes64(blocks, signed)
        assert torch.equal(codes.long(), want)


def test_chunked_passes_give_the_same_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(10 * B + 3, generator=torch.Generator().manual_seed(1))
    for name, xx in (("exp_avg", x), ("exp_avg_sq", x.square())):
        whole = _roundtrip(xx, name)
        monkeypatch.setattr(quant8, "CHUNK", 3 * B)  # four passes, the last one short
        chunked = _roundtrip(xx, name)
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_zero_blocks_and_the_block_max_are_exact() -> None:
    x = torch.zeros(3 * B + 5)
    x[B + 3] = -2.5  # block 1 holds one value: its absmax, exact
    x[3 * B + 1] = 7.0  # the short last block
    for name in ("exp_avg", "exp_avg_sq"):
        xx = x if name == "exp_avg" else x.square()
        got, codes, scales = _roundtrip(xx, name)
        assert torch.equal(got, xx)
        assert float(scales[0]) == 0.0 and float(scales[2]) == 0.0 and not codes[:B].any()


def test_tiny_values_keep_a_code_down_to_the_finest_decade() -> None:
    """Linear codes stored |m| < absmax/254 and sqrt(v) < absmax/510 as 0; the dynamic map keeps m down to
    1e-6 of the block's absmax and sqrt(v) down to 1e-7 (v to 1e-14), and flushes only below half that."""
    m = torch.zeros(B, dtype=torch.float64)
    m[:6] = torch.tensor([1.0, -1e-6, 3e-5, 6e-7, 4e-7, -1e-3])
    got, _, _ = _roundtrip(m, "exp_avg")
    assert float(got[0]) == 1.0 and float(got[4]) == 0.0 and not got[6:].any()  # 4e-7 < 1e-6 / 2: flushed
    torch.testing.assert_close(got[[1, 3, 5]], torch.tensor([-1e-6, 1e-6, -1e-3], dtype=torch.float64), rtol=1e-7,
                               atol=0)  # on codes (float32 table)
    assert float(got[2]) == pytest.approx(3.25e-5, rel=1e-7)  # codes of decade 1e-5..1e-4: 3.25e-5, 5.5e-5, ...
    v = torch.zeros(B, dtype=torch.float64)
    v[:5] = torch.tensor([1.0, 1e-14, 1e-12, 4e-15, 2e-15])  # sqrt: 1, 1e-7, 1e-6, 6.3e-8, 4.5e-8
    got, _, _ = _roundtrip(v, "exp_avg_sq")
    torch.testing.assert_close(got[:4], torch.tensor([1.0, 1e-14, 1e-12, 1e-14], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert float(got[4]) == 0.0 and not got[5:].any()


def test_nan_reads_back_as_nan_for_its_block_only() -> None:
    for name in ("exp_avg", "exp_avg_sq"):
        x = torch.ones(2 * B)
        x[3] = float("nan")
        got, _, _ = _roundtrip(x, name)
        assert bool(got[:B].isnan().all()) and torch.equal(got[B:], x[B:])


# ------------------------------------------------------------------ in the optimizer


def _trained(moment_dtype: object, **ctor: object) -> tuple[torch.nn.Module, adams_dist.Adams_ZeRO]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 3))
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2, moment_dtype=moment_dtype, **ctor)  # type: ignore[arg-type]
    for step in range(3):
        model(torch.randn(8, 40, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _moments(sd: dict) -> list[torch.Tensor]:
    return [e[k] for e in sd["state"].values() for k in ("exp_avg", "exp_avg_sq")]


def test_state_dicts_hold_float_moments_and_load_across_formats() -> None:
    _, q8 = _trained("8bit")
    sd8 = q8.state_dict()
    assert all(t.dtype == torch.float32 for t in _moments(sd8))
    assert not any(k.endswith("_scale") for e in sd8["state"].values() for k in e)
    # 8bit -> fp32: the values the codes stand for, exactly
    _, fp = _trained(None)
    fp.load_state_dict(sd8)
    for a, b in zip(_moments(fp.state_dict()), _moments(sd8)):
        assert torch.equal(a, b)
    # fp32 -> 8bit: quantized on loading, as the float64 model quantizes them
    _, fp = _trained(None)
    sd32 = fp.state_dict()
    q8.load_state_dict(sd32)
    for got, want in zip(_moments(q8.state_dict()), _moments(sd32)):
        model = quantized64(want.reshape(-1), signed=bool((want < 0).any())).view(want.shape)
        torch.testing.assert_close(got.double(), model, rtol=1e-6, atol=1e-12)
        assert not torch.equal(got, want)  # quantized, not copied
    # 8bit -> 8bit: codes of dequantized codes are the same values, to float32 rounding
    sd8b = q8.state_dict()
    q8.load_state_dict(sd8b)
    for a, b in zip(_moments(q8.state_dict()), _moments(sd8b)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("ctor", [{}, {"master_remainder": True}, {"master_dtype": None}])
def test_8bit_moments_state_bytes_and_bf16_masters(ctor: dict) -> None:
    """bf16 params with the remainder or no master combine with 8-bit moments. Bytes per param in one process,
    the parameters themselves (and an fp32 master that is the parameter) not counted: 2 for the codes, 2 more
    for a remainder, plus the scales (8 bytes per 256) and Adams' u and sigma."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64).to(torch.bfloat16 if ctor else torch.float32))
    opt = adams_dist.Adams_ZeRO([w], lr=1e-2, moment_dtype="8bit", **ctor)
    w0 = w.detach().clone()
    for _ in range(2):
        w.grad = torch.randn_like(w)
        opt.step()
    assert not torch.equal(w.detach(), w0) and bool(torch.isfinite(w).all())
    scales = 2 * 4 / quant8.BLOCK
    u_sigma = (64 + 1) * 4 / w.numel()
    want = (4 if "master_remainder" in ctor else 2) + scales + u_sigma
    assert opt.state_bytes() / w.numel() == pytest.approx(want)


@pytest.mark.parametrize("rule", ["adamw", "adamsrf"])
def test_eps_rules_step_as_with_float_moments_where_linear_codes_stored_v_as_0(rule: str) -> None:
    """Element 0's gradient flips sign each step: the block's largest v, a small m. The others have steady
    gradients 1e-2 .. 1e-5 of it: their m within 2-4 decades of the block's absmax m, sqrt(v) within 2-5.
    Linear codes kept m above absmax/254 but stored sqrt(v) below absmax/510 as 0: after 100 steps some
    elements had moved 7x (AdamW), 45x (AdamSRF) as far as with float moments. The dynamic map keeps every
    element within 0.4x-1.6x (its finest decades hold 1 to 4 codes, and nearest rounding lets m and v lag)
    and the typical one within 10%."""
    g = torch.zeros(B, dtype=torch.float64)
    g[1:] = 10 ** -torch.linspace(2, 5, B - 1, dtype=torch.float64)
    finals = []
    for moment_dtype in (None, "8bit"):
        w = torch.nn.Parameter(torch.zeros(B, dtype=torch.float64))
        opt = adams_dist.create_optimizer(rule, [w], lr=1e-5 if rule == "adamsrf" else 1e-3, weight_decay=0.0,
                                          moment_dtype=moment_dtype, master_dtype=torch.float64)
        for step in range(100):
            w.grad = g.clone()
            w.grad[0] = (-1.0) ** step
            opt.step()
        finals.append(w.detach().clone())
    fp, q8 = finals
    assert bool((fp[1:] < 0).all())  # every steady element moved
    ratio = q8[1:] / fp[1:]
    assert 0.4 < float(ratio.min()) and float(ratio.max()) < 1.6, (float(ratio.min()), float(ratio.max()))
    assert abs(float(ratio.median()) - 1) < 0.1


@pytest.mark.parametrize("rule", ["adams", "adamw"])
def test_parameters_over_the_batch_are_updated_in_pieces_with_the_same_bits(
        monkeypatch: pytest.MonkeyPatch, rule: str) -> None:
    """A parameter larger than QUANT_BATCH is dequantized a piece of whole blocks at a time (bounded memory):
    the same bits as at once, spectral decay (applied to the whole matrix first) included."""
    from adams_dist import storage

    def run(batch: int) -> list[torch.Tensor]:
        monkeypatch.setattr(storage, "QUANT_BATCH", batch)
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((40, 33), (300,), (7, 5))]
        opt = adams_dist.create_optimizer(rule, params, lr=1e-2, weight_decay=0.5, moment_dtype="8bit")
        loaded: list[int] = []  # elements dequantized at once
        monkeypatch.setattr(quant8, "load", lambda st, name, dtype, f=quant8.load: loaded.append(st[name].numel())
                            or f(st, name, dtype))
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        assert 0 < max(loaded) <= batch
        state = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq", "exp_avg_scale")]
        return [p.detach().clone() for p in params] + state

    whole, cut = run(1 << 22), run(2 * quant8.BLOCK)  # (40, 33): 1320 elements in pieces of 512, 512, 296
    for a, b in zip(whole, cut, strict=True):
        assert torch.equal(a, b)
