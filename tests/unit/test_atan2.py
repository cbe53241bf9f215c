"""The polynomial atan2 of the compiled kernels against float64 atan2: accuracy and special values."""

from __future__ import annotations

import math

import pytest
import torch

from adams_dist.rules import compile_supported
from adams_dist.rules.atan2 import atan2, atan2_nonneg


def ulp_error(got: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|got - atan2(y, x)| in units of the float32 spacing at the exact result."""
    exact = torch.atan2(y.double(), x.double())
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.abs().clamp_min(2.0**-126)).exponent - 24)
    return (got.double() - exact).abs() / spacing


def wide_inputs(n: int = 1_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes over ~40 decades in y and in x (the ratio is what matters), both signs of y."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 10)
    x = torch.randn(n, generator=g).abs() * torch.exp(torch.randn(n, generator=g) * 10)
    ratio_near_one = torch.rand(1000, generator=g) * 0.02 + 0.99  # the |y| = x seam of the reduction
    y[:1000], x[:1000] = ratio_near_one * x[:1000], x[:1000]
    return y, x


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_within_two_ulp_of_float64(compiled: bool) -> None:
    if compiled and not compile_supported(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    fn = torch.compile(atan2_nonneg) if compiled else atan2_nonneg
    y, x = wide_inputs()
    err = ulp_error(fn(y, x), y, x)
    assert float(err.max()) <= 2.0, float(err.max())
    assert float(err.mean()) <= 0.5, float(err.mean())  # mostly correctly rounded, not just bounded
    reference = ulp_error(torch.atan2(y, x), y, x)  # torch's own float32 atan2, for scale
    assert float(err.mean()) <= 2 * float(reference.mean()) + 0.1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_special_values_match_torch(compiled: bool) -> None:
    if compiled and not compile_supported(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    inf, nan = math.inf, math.nan
    y = torch.tensor([0.0, -0.0, 1.0, -1.0, 3e-42, -3e-42, 1e30, inf, -inf, nan, 0.0, 2.0, -5e-39, -0.0, -0.0, nan])
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 7e-42, 1e-30, 1.0, 5.0, 1.0, nan, inf, 1e-38, 3.0, nan, 0.0])
    fn = torch.compile(atan2_nonneg, dynamic=False) if compiled else atan2_nonneg
    got, want = fn(y, x), torch.atan2(y, x)
    torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0.0, equal_nan=True)
    numbers = ~want.isnan()  # signed zeros keep their sign (a NaN's sign bit means nothing)
    assert torch.equal(torch.signbit(got)[numbers], torch.signbit(want)[numbers])


def test_float64_is_exact_torch_atan2() -> None:
    y, x = wide_inputs(10_000)
    assert torch.equal(atan2_nonneg(y.double(), x.double()), torch.atan2(y.double(), x.double()))


def traced_ops(fn, *args) -> set[str]:
    """The ops torch.compile traces ``fn(*args)`` into (a backend that records the graph and runs it)."""
    seen: set[str] = set()

    def record(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
        return gm.forward

    torch.compile(fn, backend=record, fullgraph=True)(*args)
    return seen


def test_rules_atan2_is_torch_atan2_when_eager_and_the_polynomial_when_compiled() -> None:
    y, x = wide_inputs(1000)
    assert torch.equal(atan2(y, x), torch.atan2(y, x))
    float32_ops = traced_ops(atan2, y, x)
    # the polynomial, its signs from y's through the division and selects: no bit casts (a scalar loop
    # per vector in inductor's CPU code) and no copysign (a library call per vector)
    assert not any("atan2" in op for op in float32_ops) and "<built-in function truediv>" in float32_ops
    assert not {"view", "copysign", "<built-in function or_>", "<built-in function and_>"} & float32_ops, float32_ops
    assert any("atan2" in op for op in traced_ops(atan2, y.double(), x.double()))  # float64: torch.atan2
