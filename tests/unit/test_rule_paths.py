"""Every eager path of every element-wise rule equals its one update function applied to whole tensors.

The chunked path (large tensors) and the batched path (small tensors) are checked against
``rule.make_update(...)(g, *state)`` on each whole tensor, for each registered rule. (The compiled
path is checked against these in test_kernels_and_info.py; no rule has a hand-written path.)
"""

from __future__ import annotations

import pytest
import torch

from adams_dist import rules
from adams_dist.decay import Decay
from adams_dist.rules.elementwise import CHUNK_PER_THREAD, pieces

COMPILED_MIN = rules.COMPILED_MIN_NUMEL

# Every hyperparameter any built-in rule reads; tau sits inside the range of v_hat, so HomeAdamEW
# takes both branches.
GROUP = dict(betas=(0.9, 0.99), eps=1e-3, tau=0.3, a=1.27, b=2.0, bias_correction_in_atan2=True)
LR, KEEP = 1e-2, 1.0 - 1e-3
ELEMENTWISE = [r for r in map(rules.get, rules.names()) if isinstance(r, rules.ElementwiseRule)]


def tensors(sizes: list[int], rule: rules.ElementwiseRule, seed: int = 0) -> tuple[list, list[tuple]]:
    """params and (g, *state) per tensor; the second state (v, for the Adam rules) is positive."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in sizes]
    rest = [tuple(torch.randn(n, generator=g) if k < 2 else torch.rand(n, generator=g)
                  for k in range(1 + len(rule.state_names))) for n in sizes]
    return params, rest


def by_function(rule: rules.ElementwiseRule, params: list, rest: list[tuple], steps: list[float]) -> None:
    for p, ts, step in zip(params, rest, steps):
        p.mul_(KEEP).add_(rule.make_update(GROUP, LR, step)(*ts))


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_every_built_in_rule_is_covered() -> None:
    assert {r.name for r in ELEMENTWISE} >= {"atan2", "adamw", "srf", "homeadamew"}


@pytest.mark.parametrize("rule", ELEMENTWISE, ids=lambda r: r.name)
def test_chunked_large_path_equals_the_function(rule: rules.ElementwiseRule) -> None:
    n = 2 * CHUNK_PER_THREAD * torch.get_num_threads() + 12345  # three chunks, the last one partial
    params, rest = tensors([n], rule)
    want_p, want_rest = [p.clone() for p in params], [tuple(t.clone() for t in ts) for ts in rest]
    by_function(rule, want_p, want_rest, [3.0])
    update = rule.make_update(GROUP, LR, 3.0)
    work = pieces(params[0], rest[0], Decay(keep=KEEP))
    assert rule.update_large(work, update, compiled=False, strict=False) is False
    assert_same(params + list(rest[0]), want_p + list(want_rest[0]))


@pytest.mark.parametrize("rule", ELEMENTWISE, ids=lambda r: r.name)
def test_batched_small_path_equals_the_function(rule: rules.ElementwiseRule) -> None:
    sizes, steps = [1, 7, 300, 5000, 64, 0, 9], [4.0, 4.0, 4.0, 2.0, 4.0, 4.0, 2.0]  # two step counts
    params, rest = tensors(sizes, rule)
    want_p, want_rest = [p.clone() for p in params], [tuple(t.clone() for t in ts) for ts in rest]
    by_function(rule, want_p, want_rest, steps)
    rule.update_small(params, rest, steps, [Decay(keep=KEEP)] * len(sizes), GROUP, LR)
    assert_same(params + [t for ts in rest for t in ts], want_p + [t for ts in want_rest for t in ts])


@pytest.mark.skipif(not rules.compile_supported(torch.device("cpu")), reason="no C++ compiler for torch.compile")
def test_a_kernel_that_fails_to_build_leaves_each_piece_updated_once(monkeypatch) -> None:
    """Compiled calls take up to GROUP_PIECES pieces; when a later call's kernel fails to build, only the
    pieces not yet updated take the eager path (an update applied twice would move them twice as far)."""
    from adams_dist.rules import compiled, elementwise

    rule = rules.get("adamw")
    n = compiled.GROUP_PIECES + 1  # one full call, then one piece whose kernel "fails"
    params, rest = tensors([COMPILED_MIN + 7 * i for i in range(n)], rule)
    want_p, want_rest = [p.clone() for p in params], [tuple(t.clone() for t in ts) for ts in rest]
    by_function(rule, want_p, want_rest, [3.0] * n)

    def kernel_or_failure(name, rule_fn, flat, rank1):
        if flat < compiled.GROUP_PIECES:
            raise RuntimeError("no compiler for this one")
        return compiled.compiled_kernel(name, rule_fn, flat, rank1)

    monkeypatch.setattr(elementwise, "compiled_kernel", kernel_or_failure)
    work = [piece for p, ts in zip(params, rest) for piece in pieces(p, ts, Decay(keep=KEEP))]
    with pytest.warns(RuntimeWarning, match="compiled kernel unavailable"):
        assert rule.update_large(work, rule.make_update(GROUP, LR, 3.0), compiled=True, strict=False) is False
    for got, want in zip(params + [t for ts in rest for t in ts], want_p + [t for ts in want_rest for t in ts]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_group_pieces_sets_the_tensors_per_compiled_call(monkeypatch) -> None:
    """``rules.compiled.GROUP_PIECES`` is read at each step: 5 tensors at 2 a call are 3 calls (2, 2, 1)."""
    from adams_dist.rules import compiled, elementwise

    rule = rules.get("adamw")
    calls: list[tuple[int, int]] = []

    def eager_kernel(name, rule_fn, flat, rank1):  # the kernel's own Python function, not compiled
        calls.append((flat, rank1))
        return compiled.compiled_kernel(name, rule_fn, flat, rank1)._torchdynamo_orig_callable

    monkeypatch.setattr(compiled, "GROUP_PIECES", 2)
    monkeypatch.setattr(elementwise, "compiled_kernel", eager_kernel)
    params, rest = tensors([COMPILED_MIN + i for i in range(5)], rule)
    want_p, want_rest = [p.clone() for p in params], [tuple(t.clone() for t in ts) for ts in rest]
    by_function(rule, want_p, want_rest, [3.0] * 5)
    work = [piece for p, ts in zip(params, rest) for piece in pieces(p, ts, Decay(keep=KEEP))]
    assert rule.update_large(work, rule.make_update(GROUP, LR, 3.0), compiled=True, strict=True) is True
    assert calls == [(2, 0), (2, 0), (1, 0)]
    assert_same(params + [t for ts in rest for t in ts], want_p + [t for ts in want_rest for t in ts])
