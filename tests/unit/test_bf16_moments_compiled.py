"""``moment_dtype=torch.bfloat16`` under ``kernel="compiled"``: the fused kernels widen the stored moments, update
and round them back in one pass, against the eager bf16 path (which test_rules_reference.py checks against the
float64 reference); and their loops step by a whole bf16 vector (rules/compiled.py), the atan2 rules' included
(their sign comes without bit casts, which would keep the loops narrow)."""

from __future__ import annotations

import types

import pytest
import torch

import adams_dist
from adams_dist.rules import compile_supported, compiled

# (300, 257): rows of 257 under spectral decay; (1100, 31): rows shorter than a bf16 vector; (70001,): a vector,
# scalar decay folded into the kernel; (40, 33): small, eager in both runs
SHAPES = ((300, 257), (1100, 31), (70001,), (40, 33))

needs_compiler = pytest.mark.skipif(not compile_supported(torch.device("cpu")), reason="no C++ compiler")


def _train(rule: str, kernel: str, dtype: torch.dtype, steps: int = 3) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.1) for s in SHAPES]
    opt = adams_dist.create_optimizer(rule, params, lr=1e-2, weight_decay=0.5, moment_dtype=torch.bfloat16,
                                      kernel=kernel, master_dtype=dtype)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    assert opt.kernel == kernel  # the compiled run did not fall back to the eager path
    return [p.detach().clone() for p in params], [dict(opt.state[p]) for p in params]


@needs_compiler
@pytest.mark.parametrize("rule", ["adams", "adamatan2", "adamw"])
def test_compiled_bf16_moments_match_the_eager_bf16_path(rule: str) -> None:
    """float64 masters: the same bf16 moments, and weights to float64 rounding."""
    got_p, got_state = _train(rule, "compiled", torch.float64)
    want_p, want_state = _train(rule, "foreach", torch.float64)
    for shape, a, b, sa, sb in zip(SHAPES, got_p, want_p, got_state, want_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m, s=shape: f"{s}: {m}")
        for name in ("exp_avg", "exp_avg_sq"):
            assert sa[name].dtype == torch.bfloat16 and torch.equal(sa[name], sb[name]), (shape, name)


@needs_compiler
def test_compiled_bf16_moments_in_float32_stay_within_a_rounding_of_the_eager_path() -> None:
    """float32: the kernel's fused multiply-adds move a few moments across a bf16 rounding midpoint."""
    got_p, got_state = _train("adams", "compiled", torch.float32)
    want_p, want_state = _train("adams", "foreach", torch.float32)
    for shape, a, b, sa, sb in zip(SHAPES, got_p, want_p, got_state, want_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, s=shape: f"{s}: {m}")
        for name in ("exp_avg", "exp_avg_sq"):
            ulps = (sa[name].view(torch.int16).int() - sb[name].view(torch.int16).int()).abs()
            assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 0.01, (shape, name)


@needs_compiler
@pytest.mark.parametrize("rule", ["adamw", "adams"])
def test_bf16_moment_kernels_step_a_whole_bf16_vector_and_no_other_kernel_changes(rule: str, monkeypatch) -> None:
    """Inductor would step these loops by a float32 vector and move the bf16 moments in half vectors (2-3x
    slower); ours step by a bf16 vector. A kernel compiled outside ours keeps inductor's own choice."""
    from torch._inductor.codegen import cpp

    isa = cpp.cpu_vec_isa.pick_vec_isa()
    if not isa or isa.nelements(dtype=torch.bfloat16) <= isa.nelements(dtype=torch.float32):
        pytest.skip("no vector ISA with wider bf16 vectors here")
    compiled._widen_lowp_loops_in_builds()
    seen: list[tuple[bool, list[int]]] = []
    ours = cpp.TilingSelect.select_tiling

    def spy(self, fn_list, var_sizes_list):  # type: ignore[no-untyped-def]
        factors, indices, stats = ours(self, fn_list, var_sizes_list)
        seen.append((getattr(compiled._building, "ours", False), list(factors)))
        return factors, indices, stats

    monkeypatch.setattr(cpp.TilingSelect, "select_tiling", spy)
    monkeypatch.setattr(compiled, "_compiled_cache", {})  # build afresh, so that the code is generated here
    _train(rule, "compiled", torch.float32, steps=1)
    wide = isa.nelements(dtype=torch.bfloat16)
    assert (True, [wide]) in seen, seen

    def user_update(p, g, m):  # the same pattern in a kernel that is not ours
        w = m.float().mul_(0.9).add_(g, alpha=0.1)
        p.add_(w * -1e-3)
        m.copy_(w)

    seen.clear()
    n = 1 << 16
    # a code object of its own: the other parametrization's compile of it would be reused without codegen
    user_update = types.FunctionType(user_update.__code__.replace(), globals())
    torch.compile(user_update, dynamic=True, options={"fx_graph_cache": False})(
        torch.zeros(n), torch.ones(n), torch.zeros(n, dtype=torch.bfloat16))
    assert seen and all(not mine and factors != [wide] for mine, factors in seen), seen
