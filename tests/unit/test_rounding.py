"""Stochastic rounding into bfloat16 (adams_dist/rounding.py) and ``master_dtype=None`` in one process.

The quantizer is checked against a float64 model of what it must do: return one of the two bfloat16
neighbours of the value, the upper one (in magnitude) with probability equal to the dropped fraction.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import adams_dist
from adams_dist import rounding

BF16 = torch.bfloat16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 model: the bf16 values just below and above |x| (sign kept) and the fraction of the gap."""
    x64 = x.double()
    low = (x.view(torch.int32) & -65536).view(torch.float32).double()  # truncation toward zero
    ulp = torch.ldexp(torch.ones_like(x64), torch.frexp(low)[1] - 8).abs()  # bf16 spacing at |low|
    high = low + torch.sign(x64) * ulp
    return low, high, ((x64 - low) / (high - low)).abs()


def test_rounds_to_a_neighbour_with_the_right_probability() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(64, generator=g) * torch.logspace(-20, 20, 64)  # both signs, many binades
    n = 20_000  # samples per value, one element index each
    samples = values.repeat_interleave(n)
    out = torch.empty_like(samples, dtype=BF16)
    rounding.stochastic_round_(out, samples, rounding.key(0, 3, 7), rounding.from_first(0))
    got = out.double().view(64, n)
    low, high, frac = _neighbours(values)
    assert torch.all((got == low[:, None]) | (got == high[:, None])), "not a bf16 neighbour of the value"
    up = (got == high[:, None]).double().mean(1)
    sigma = (frac * (1 - frac) / n).sqrt()
    assert torch.all((up - frac).abs() <= 5 * sigma + 1e-12), (up - frac).abs().max()
    assert float((got.mean(1) - values.double()).abs().div(high - low).abs().max()) < 0.02  # unbiased


def test_exact_and_special_values_are_kept() -> None:
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0**100, float("inf"), -float("inf")])
    out = torch.empty_like(exact, dtype=BF16)
    rounding.stochastic_round_(out, exact, rounding.key(1, 0, 1), rounding.from_first(5))
    assert torch.equal(out.float(), exact.to(BF16).float())
    nan = torch.empty(1, dtype=BF16)
    rounding.stochastic_round_(nan, torch.tensor([math.nan]), 123, rounding.from_first(0))
    assert nan.isnan().all()


def test_the_bits_depend_on_seed_parameter_step_and_element_only() -> None:
    x = torch.full((4096,), 1.0 + 2**-9)  # exactly halfway between two bf16 values
    def rounded(seed: int, index: int, step: int, first: int) -> torch.Tensor:
        out = torch.empty_like(x, dtype=BF16)
        rounding.stochastic_round_(out, x, rounding.key(seed, index, step), rounding.from_first(first))
        return out
    base = rounded(0, 1, 1, 0)
    assert torch.equal(base, rounded(0, 1, 1, 0))
    for other in (rounded(1, 1, 1, 0), rounded(0, 2, 1, 0), rounded(0, 1, 2, 0), rounded(0, 1, 1, 1)):
        assert not torch.equal(base, other)
    # a slice of the parameter gets the bits of the same elements of the whole
    assert torch.equal(rounded(0, 1, 1, 0)[1000:], rounded(0, 1, 1, 1000)[:-1000])


def _run(master_dtype: torch.dtype | None, lr: float, steps: int, seed: int = 0) -> torch.Tensor:
    """The weights the optimizer holds after ``steps`` equal updates: the fp32 master when it keeps one."""
    w = nn.Parameter(torch.ones(4096, dtype=BF16))
    opt = adams_dist.AdamATan2([w], lr=lr, weight_decay=0.0, master_dtype=master_dtype, rounding_seed=seed)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    return opt.state[w]["master_param"].detach().double()


def test_updates_below_half_a_bf16_step_are_not_lost() -> None:
    """400 steps of about 8e-5 each from 1.0: every step is below half a bf16 spacing (2**-9), so rounding to
    nearest alone would never move. Stochastic rounding arrives where the fp32 master does, on average:
    within 5 standard deviations of its random walk (0.011 per element, over 4096 elements)."""
    master = _run(torch.float32, 1e-4, 400)
    sr = _run(None, 1e-4, 400)
    assert master.dtype == torch.float64 and float(master.mean()) < 0.975
    assert abs(float(sr.mean()) - float(master.mean())) < 5 * 0.011 / 64, (sr.mean(), master.mean())
    assert torch.equal(sr, _run(None, 1e-4, 400)), "not reproducible"
    assert not torch.equal(sr, _run(None, 1e-4, 400, seed=1))


def test_no_master_holds_no_master_state_and_refuses_fp32() -> None:
    model = nn.Linear(16, 8).to(BF16)
    opt = adams_dist.Adams_ZeRO(model.parameters(), master_dtype=None, moment_dtype=BF16)
    assert all(opt.state[p]["master_param"].data_ptr() == p.data_ptr() for p in model.parameters())
    assert opt.state_bytes() < 5 * sum(p.numel() for p in model.parameters())  # bf16 m and v, plus u
    with pytest.raises(ValueError, match="float32, which is its own master"):
        adams_dist.Adams_ZeRO(nn.Linear(4, 4).parameters(), master_dtype=None)
    with pytest.raises(ValueError, match="rounding_seed"):
        adams_dist.AdamW(model.parameters(), rounding_seed=-1)


# ------------------------------------------------------------------ master_remainder


def test_split_and_combine_give_back_every_float32_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1 + 2**-8, -(1 + 2**-8), 1 + 3 * 2**-8, 3.3e38, -3.3e38,
                            float("inf"), -float("inf"), 1e-45, -1e-45])
    x = torch.cat([bits.view(torch.float32), special])
    x = x[torch.isfinite(x) | x.isinf()]
    high, rem = torch.empty_like(x, dtype=BF16), torch.empty_like(x, dtype=torch.int16)
    rounding.split_(x, high, rem)
    assert torch.equal(rounding.combine(high, rem).view(torch.int32), x.view(torch.int32))
    # the bf16 part is x rounded to nearest; only exact ties (low 16 bits 0x8000) go away from zero
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(high[~tie], x[~tie].to(BF16))
    assert torch.all(high[tie].double().abs() > x[tie].double().abs())


def _bf16_run(seed: int, steps: int, **options) -> tuple[list[torch.Tensor], dict, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3)).to(BF16)
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-3, **options)
    for step in range(steps):
        x = torch.randn(16, 40, generator=torch.Generator().manual_seed(step)).to(BF16)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict(), opt


def test_remainder_is_bit_for_bit_the_fp32_master_run_in_half_the_master_bytes() -> None:
    want, want_sd, fp32_opt = _bf16_run(0, 30)
    got, got_sd, opt = _bf16_run(0, 30, master_remainder=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for i, entry in want_sd["state"].items():  # the saved master is the fp32 one, the same bits
        for name in ("master_param", "exp_avg", "exp_avg_sq", "u"):
            if name in entry:
                assert got_sd["state"][i][name].dtype == entry[name].dtype and torch.equal(got_sd["state"][i][name],
                                                                                          entry[name]), (i, name)
    n = sum(p.numel() for p in got)
    assert fp32_opt.state_bytes() - opt.state_bytes() == 2 * n  # int16 remainders instead of fp32 masters


def test_remainder_state_dicts_load_both_ways_and_resume_exactly() -> None:
    want, _, _ = _bf16_run(0, 12)
    for saver, loader in (({}, {"master_remainder": True}), ({"master_remainder": True}, {})):
        _, sd, _ = _bf16_run(0, 6, **saver)
        params, _, _ = _bf16_run(0, 6, **saver)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3)).to(BF16)
        with torch.no_grad():
            for p, v in zip(model.parameters(), params):
                p.copy_(v)
        opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-3, **loader)
        opt.load_state_dict(sd)
        for step in range(6, 12):
            x = torch.randn(16, 40, generator=torch.Generator().manual_seed(step)).to(BF16)
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), want)), (saver, loader)


def test_remainder_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="master_remainder=True keeps the master in bfloat16 parameters; "
                                         "parameter #0 is torch.float32, which is its own master"):
        adams_dist.Adams_ZeRO(nn.Linear(4, 4).parameters(), master_remainder=True)
    bf16 = nn.Linear(4, 4).to(BF16).parameters()
    with pytest.raises(ValueError, match="needs master_dtype=torch.float32"):
        adams_dist.AdamW(bf16, master_remainder=True, master_dtype=None)
    with pytest.raises(TypeError, match="master_remainder must be True or False"):
        adams_dist.AdamW(nn.Linear(4, 4).to(BF16).parameters(), master_remainder=1)
