"""kernel="background": eager steps while a thread builds the compiled kernels, then the kernels; ranks switch together."""

from __future__ import annotations

import time

import pytest
import torch

import adams_dist
from adams_dist.rules import compile_supported
from adams_dist.testing import run

needs_compiler = pytest.mark.skipif(not compile_supported(torch.device("cpu")), reason="no C++ compiler")

# A matrix big enough for the compiled kernels (its rank-1 decay fused in) and a vector for the small path.
SHAPES = [(512, 160), (37,)]  # at W = 2 each rank holds 40960 elements of the matrix


def make_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def grads(step: int, rank: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def eager_calls() -> list[int]:
    """Count the eager path's calls for large tensors from here on (this process)."""
    from adams_dist.rules import elementwise

    calls = [0]
    original = elementwise.add_in_chunks

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    elementwise.add_in_chunks = counting
    return calls


def one_process_worker(rank: int, world: int) -> dict:
    calls = eager_calls()
    params = make_params()
    opt = adams_dist.Adams_ZeRO(params, weight_decay=0.5, kernel="background")
    path, steps, pending_after_first = opt.kernel_path, 0, None
    start = time.perf_counter()
    first_step_s = None
    while True:
        for p, g in zip(params, grads(steps)):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        steps += 1
        if first_step_s is None:
            first_step_s, pending_after_first = time.perf_counter() - t0, opt._builds.pending
        if not opt._builds.pending and steps >= 3 and calls[0] and opt._builds.allowed:
            break  # built: the next steps may use the kernels
        assert time.perf_counter() - start < 300, "the background build did not finish in 300 s"
        time.sleep(0.05)
    eager_before = calls[0]
    for _ in range(3):
        for p, g in zip(params, grads(steps)):
            p.grad = g
        opt.step()
        steps += 1
    return {"path": path, "steps": steps, "first_step_s": first_step_s, "pending_after_first": pending_after_first,
            "eager_before": eager_before, "eager_after": calls[0] - eager_before,
            "params": [p.detach().clone() for p in params]}


def foreach_reference(steps: int, world: int = 1) -> list[torch.Tensor]:
    params = make_params()
    opt = adams_dist.Adams_ZeRO(params, weight_decay=0.5, kernel="foreach")
    for step in range(steps):
        mean = [torch.stack(gs).mean(0) for gs in zip(*(grads(step, r) for r in range(world)))]
        for p, g in zip(params, mean):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


@needs_compiler
def test_background_builds_then_switches_without_a_compile_on_the_training_thread(tmp_path) -> None:
    # a fresh inductor cache: the build is as cold as on a new machine
    (res,) = run(one_process_worker, 1, timeout=420, process_group=False,
                 env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert res["path"] == "background"
    assert res["pending_after_first"], "the first step waited for the kernel build"
    assert res["eager_before"] > 0 and res["eager_after"] == 0  # eager while building, compiled afterwards
    for a, b in zip(res["params"], foreach_reference(res["steps"])):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def synced_worker(rank: int, world: int) -> dict:
    """Rank 1 builds 3 s later than rank 0: both must still take the compiled kernels from the same step."""
    import torch.distributed as dist

    from adams_dist.rules import background

    if rank == 1:
        work = background.BackgroundBuilds._work

        def late(self):
            time.sleep(3.0)
            work(self)

        background.BackgroundBuilds._work = late
    params = make_params()
    opt = adams_dist.Adams_ZeRO(params, weight_decay=0.5, kernel="background")
    allowed, steps, done_in_a_row = [], 0, 0
    while done_in_a_row < 3:
        for p, g in zip(params, grads(steps, rank)):
            p.grad = g
        opt.step()
        steps += 1
        allowed.append(opt._builds.allowed)
        flag = torch.tensor([float(opt._builds.allowed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # stop together
        done_in_a_row = done_in_a_row + 1 if flag.item() else 0
        assert steps < 2000, "the ranks never both used the compiled kernels"
        time.sleep(0.05)
    return {"allowed": allowed, "steps": steps, "params": [p.detach().clone() for p in params]}


@needs_compiler
def test_ranks_switch_to_the_compiled_kernels_at_the_same_step(tmp_path) -> None:
    results = run(synced_worker, 2, timeout=420, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert results[0]["allowed"] == results[1]["allowed"]
    assert results[0]["allowed"][0] is False and results[0]["allowed"][-1] is True
    for res in results:
        for a, b in zip(res["params"], foreach_reference(res["steps"], world=2)):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_another_threads_compile_does_not_change_the_eager_path() -> None:
    """torch.compiler.is_compiling() is one flag for the process while any thread compiles; the rules'
    traced branches (the polynomial atan2) must follow this thread's tracing, not that flag."""
    y, x = torch.randn(1000), torch.rand(1000)
    with torch.compiler._compile_session_context():  # what another thread's compile sets
        assert torch.compiler.is_compiling()
        got = adams_dist.rules.atan2(y, x)
    assert torch.equal(got, torch.atan2(y, x))


def mismatched_worker(rank: int, world: int) -> dict:
    """Stand-ins whose head count (1 here) is built as 2: the kernels never match the real tensors."""
    import warnings

    from adams_dist.rules import background

    stand_in = background._stand_in

    def two_heads(described):
        kind, dtype, requires_grad, contiguous, shape, offset = described
        shape = (2, *shape[1:]) if len(shape) == 3 and shape[0] == 1 else shape
        return stand_in((kind, dtype, requires_grad, contiguous, shape, offset))

    background._stand_in = two_heads
    calls = eager_calls()
    params = make_params()
    opt = adams_dist.Adams_ZeRO(params, weight_decay=0.5, kernel="background")
    steps, start = 0, time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while steps < 4 or opt._builds.pending or max(b.attempts for b in opt._builds._builds.values()) < 2:
            for p, g in zip(params, grads(steps)):
                p.grad = g
            opt.step()
            steps += 1
            assert time.perf_counter() - start < 300, "the background builds did not finish in 300 s"
            time.sleep(0.05)
        before = calls[0]
        for _ in range(3):  # given up: eager, with no further build
            for p, g in zip(params, grads(steps)):
                p.grad = g
            opt.step()
            steps += 1
    return {"steps": steps, "eager_after": calls[0] - before, "pending": opt._builds.pending,
            "attempts": [b.attempts for b in opt._builds._builds.values()], "warnings": [str(w.message) for w in caught],
            "params": [p.detach().clone() for p in params]}


@needs_compiler
def test_kernels_that_never_match_leave_the_eager_path_running(tmp_path) -> None:
    (res,) = run(mismatched_worker, 1, timeout=420, process_group=False,
                 env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert res["attempts"] == [2] and not res["pending"] and res["eager_after"] == 3
    assert any("did not match" in w for w in res["warnings"])
    for a, b in zip(res["params"], foreach_reference(res["steps"])):
        assert torch.equal(a, b)  # the eager path all along: bitwise the foreach run


def test_a_tall_and_a_wide_matrix_share_one_build() -> None:
    """Build signatures keep 0, 1 and equal sizes, not their order: the kernels compile without duck sizing,
    so one graph serves a tall and a wide matrix (two builds would delay the switch by one build time)."""
    from adams_dist.rules.background import _signature

    def piece(rows: int, cols: int) -> tuple:
        p, g, m, v = (torch.zeros(1, rows, cols) for _ in range(4))
        return ((), ((p, (g, m, v), torch.zeros(1, rows, 1), torch.zeros(1, 1, cols), 0.1),), None)

    kind = ("atan2", None, 0, 1)
    assert _signature(kind, None, piece(3200, 800)) == _signature(kind, None, piece(800, 3200))
    assert _signature(kind, None, piece(800, 800)) != _signature(kind, None, piece(800, 3200))  # an equality
    assert _signature(kind, None, piece(1, 800)) != _signature(kind, None, piece(2, 800))  # 1 is specialised


@needs_compiler
def test_background_builds_one_piece_kernels(monkeypatch) -> None:
    """kernel="compiled" updates up to GROUP_PIECES tensors per call; "background" builds one-piece kernels,
    whose builds take seconds instead of tens, so that its eager steps end sooner."""
    from adams_dist.rules import compiled
    from adams_dist.rules.background import BackgroundBuilds

    queued: list[tuple] = []
    monkeypatch.setattr(BackgroundBuilds, "_enqueue", lambda self, key, make, args: queued.append(key[0]))
    params = [torch.nn.Parameter(torch.randn(256, 160)) for _ in range(compiled.GROUP_PIECES + 1)]
    opt = adams_dist.Adams_ZeRO(params, kernel="background")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(queued) == len(params) and all(kind[2:] == (0, 1) for kind in queued)  # (flat, rank-1) pieces
