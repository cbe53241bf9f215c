"""adams_dist/quant8.py against the float64 model of the format (tests/reference64.py: quantized64)."""

from __future__ import annotations

import pytest
import torch

import adams_dist
from adams_dist import quant8

try:
    from tests.reference64 import quantized64
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference64 import quantized64

B = quant8.BLOCK


def _roundtrip(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = {name: torch.zeros(x.numel(), dtype=quant8.CODE_DTYPES[name]),
             **quant8.new_scales((name,), x.numel(), x.device)}
    quant8.store_(x, state, name)
    return quant8.load(state, name, x.dtype), state[name], state[quant8.scale_name(name)]


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 3 * B + 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roundtrip_matches_the_float64_model_and_its_error_bounds(n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n)
    # magnitudes over six decades, so blocks hold values far below their absmax
    m = (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** torch.empty(n, dtype=torch.float64).uniform_(
        -6, 0, generator=g)).to(dtype)
    v = m.square()
    for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        got, codes, scales = _roundtrip(x, name)
        assert codes.dtype == quant8.CODE_DTYPES[name] and scales.numel() == -(-n // B)
        model = quantized64(x, signed)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        # The same codes as the model but where x/scale sits within rounding of a half: at most one code apart
        for lo in range(0, n, B):
            blk, got_b, model_b = x[lo: lo + B].double(), got[lo: lo + B].double(), model[lo: lo + B]
            if signed:
                step = float(scales[lo // B])
                assert float((got_b - blk).abs().max()) <= step / 2 * (1 + tol) + 1e-30  # half a code
                assert float((got_b - model_b).abs().max()) <= step * (1 + tol)
            else:
                step = float(scales[lo // B])
                err = (got_b.sqrt() - blk.sqrt()).abs().max()
                assert float(err) <= step / 2 * (1 + tol) + 1e-30  # half a code of sqrt(v)
                assert bool((got_b >= 0).all())
            # float32 arithmetic: the model's value to a few ulp, or one code apart where x/scale is a tie
            off = (got_b - model_b).abs() > (tol * model_b.abs() + 1e-30)
            assert int(off.sum()) <= max(1, blk.numel() // 50), f"block at {lo}: {int(off.sum())} codes off the model"
        if dtype == torch.float64:
            torch.testing.assert_close(got.double(), model, rtol=0, atol=0)


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


def test_the_sqrt_domain_keeps_a_wider_range_of_v_than_linear_codes() -> None:
    v = torch.tensor([1.0, 1e-4] + [0.0] * (B - 2))  # linear 8-bit codes would store 1e-4 as 0
    got, _, _ = _roundtrip(v, "exp_avg_sq")
    assert 0.5e-4 < float(got[1]) < 2e-4  # code 3 of 255 in the sqrt domain: 1.38e-4


def test_nan_reads_back_as_nan_for_its_block_only() -> None:
    x = torch.ones(2 * B)
    x[3] = float("nan")
    got, _, _ = _roundtrip(x, "exp_avg")
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
