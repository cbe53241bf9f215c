"""``moment_dtype="8bit"`` under ``kernel="compiled"``: decode, update and encode fused in one compiled call per
big tensor, against the eager 8-bit path (dequantize, update, quantize) that test_quant8.py checks against the
float64 model of the format."""

from __future__ import annotations

import pytest
import torch

import adams_dist
from adams_dist import quant8, rules

# (300, 257): 77100 elements, big enough for the compiled path, 301 whole blocks and a partial one of 44;
# (70001,): a vector (scalar decay folded into the kernel); (40, 33): small, eager in both runs
SHAPES = ((300, 257), (70001,), (40, 33))


def _train(rule: str, kernel: str, dtype: torch.dtype, steps: int = 3) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.1) for s in SHAPES]
    opt = adams_dist.create_optimizer(rule, params, lr=1e-2, weight_decay=0.5, moment_dtype="8bit", kernel=kernel,
                                      master_dtype=dtype)
    for _ in range(steps):
        for p in params:  # magnitudes over six decades, so that blocks use their finest codes
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64)
                      * 10 ** torch.empty(p.shape, dtype=torch.float64).uniform_(-6, 0, generator=g)).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params], {i: dict(opt.state[p]) for i, p in enumerate(params)}


@pytest.mark.parametrize("rule", ["adams", "adamw"])
def test_compiled_8bit_step_matches_the_eager_8bit_step(rule: str) -> None:
    """float64 masters: the same codes, scales and weights as the eager path (the two round differently only
    in the last bits of float64, far from any code's midpoint)."""
    got_p, got_state = _train(rule, "compiled", torch.float64)
    want_p, want_state = _train(rule, "foreach", torch.float64)
    for a, b in zip(got_p, want_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for i in got_state:
        for name in ("exp_avg", "exp_avg_sq"):
            assert got_state[i][name].dtype == quant8.CODE_DTYPES[name]
            assert torch.equal(got_state[i][name], want_state[i][name]), (SHAPES[i], name)
            torch.testing.assert_close(got_state[i][quant8.scale_name(name)], want_state[i][quant8.scale_name(name)],
                                       rtol=1e-6, atol=0)


def test_compiled_8bit_step_in_float32_stays_within_a_code_of_the_eager_step() -> None:
    """float32: the kernel's fused multiply-adds move a few moments across a code midpoint: one code step, and
    their weights differ by a fraction of a step."""
    got_p, got_state = _train("adams", "compiled", torch.float32)
    want_p, want_state = _train("adams", "foreach", torch.float32)
    for a, b in zip(got_p, want_p, strict=True):
        off = (a - b).abs() > 1e-6 + 1e-4 * b.abs()  # where a moment took the neighbouring code
        assert float(off.float().mean()) < 1e-3
        assert float((a - b).abs().max()) <= 3 * 2 * 1e-2  # still within two steps' updates of lr each
    for i in got_state:
        for name in ("exp_avg", "exp_avg_sq"):
            diff = (got_state[i][name].int() - want_state[i][name].int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, (SHAPES[i], name)


def test_compiled_8bit_kernel_that_cannot_build_raises_and_changes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(rules.compiled, "_compiled_cache", {})

    def failing_compile(*args, **kwargs):
        def kernel(*a, **k):
            raise RuntimeError("simulated compiler failure")
        return kernel

    monkeypatch.setattr(torch, "compile", failing_compile)
    params = [torch.nn.Parameter(torch.randn(300, 257))]
    params[0].grad = torch.randn(300, 257)
    opt = adams_dist.Adams_ZeRO(params, lr=1e-2, moment_dtype="8bit", kernel="compiled")
    with pytest.raises(RuntimeError, match="kernel='compiled' was requested but torch.compile failed"):
        opt.step()
    assert not bool(opt.state[params[0]]["exp_avg"].any())  # the codes were not touched


def test_compiled_8bit_kernel_that_cannot_build_warns_and_steps_eagerly(monkeypatch) -> None:
    """Where "auto" resolves to the compiled path (CUDA), a failed build falls back to the eager 8-bit path:
    the same weights as kernel="foreach", nothing applied twice (the decay runs before the kernel)."""
    want_p, _ = _train("adams", "foreach", torch.float64)
    from adams_dist.rules import elementwise

    def cannot_build(name, rule_fn):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(elementwise, "compiled_8bit_kernel", cannot_build)
    monkeypatch.setattr(rules.Rule, "kernel_path", lambda self, device, requested="auto": (
        "foreach" if requested == "foreach" else "compiled"))
    with pytest.warns(RuntimeWarning, match="compiled kernel unavailable.*simulated"):
        got_p, _ = _train("adams", "auto", torch.float64)
    for a, b in zip(got_p, want_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
