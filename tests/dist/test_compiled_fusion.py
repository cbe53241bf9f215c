"""Decay fused into the compiled kernels: row shards that split heads, and the fallback when compiling fails."""

from __future__ import annotations

import pytest
import torch
from rule_table import hp_of

import adams_dist
from adams_dist import rules
from adams_dist.rules import COMPILED_MIN_NUMEL, compile_supported
from adams_dist.testing import run

needs_compiler = pytest.mark.skipif(not compile_supported(torch.device("cpu")), reason="no C++ compiler")

# At W = 3 every local piece is still >= COMPILED_MIN_NUMEL, and the row shards cut through heads:
# (600, 192) as 5 heads of 120 rows (200 rows per rank: a whole head plus part of one, or parts of
# three); 8 matrices (40, 320) (107 rows per rank: two whole heads, then a partial one); a matrix
# with scalar decay only (split element-wise).
SHAPES = [(600, 192), (8, 40, 320), (384, 256), (33,), (5, 7)]
STEPS = 5
HP = hp_of("decay")  # the rules with compiled kernels, with strong decay


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    adams_dist.set_heads(params[0], 5)
    params[2].use_spectral_decay = False  # type: ignore[attr-defined]
    return params


def grads(step: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) * (1 + rank) for s in SHAPES]


def train(name: str, params, grads_for_step, **engine) -> torch.optim.Optimizer:
    opt = adams_dist.create_optimizer(name, params, **HP[name], **engine)
    for step in range(STEPS):
        for p, g in zip(params, grads_for_step(step)):
            p.grad = g
        opt.step()
    return opt


def worker(rank: int, world: int) -> dict:
    out = {}
    for name in HP:
        params = make_params()
        opt = train(name, params, lambda step: grads(step, rank), kernel="compiled")
        local = [opt.state[p]["master_param"].numel() for p in params[:3]]
        out[name] = {"params": [p.detach().clone() for p in params], "path": opt.kernel_path, "local": local,
                     "sigmas": [s.clone() for s in opt.spectral_sigmas().values()]}
    return out


@needs_compiler
def test_compiled_row_shards_match_one_process_foreach() -> None:
    world = 3
    results = run(worker, world, timeout=420)
    for name in HP:
        params = make_params()
        opt = train(name, params, lambda step: [torch.stack(gs).mean(0) for gs in
                                                zip(*(grads(step, r) for r in range(world)))], kernel="foreach")
        expected = [p.detach() for p in params]
        for rank, res in enumerate(results):
            got = res[name]
            assert got["path"] == "compiled"
            assert min(got["local"]) >= COMPILED_MIN_NUMEL  # every big piece really took the compiled kernel
            for i, (a, b) in enumerate(zip(got["params"], expected)):
                torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5,
                                           msg=lambda s, i=i: f"{name} rank {rank} #{i}: {s}")
            for a, b in zip(got["sigmas"], opt.spectral_sigmas().values()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        start = make_params()
        assert all(float((p - s).detach().abs().max()) > 1e-3 for p, s in zip(expected, start))


def dtensor_worker(rank: int, world: int) -> dict:
    """FSDP2-style parameters (DTensor, Shard(0)): the compiled kernels on the local rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    params = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in make_params()]
    adams_dist.set_heads(params[0], 5)
    params[2].use_spectral_decay = False  # type: ignore[attr-defined]
    opt = adams_dist.Adams_ZeRO(params, **HP["adams"], kernel="compiled")
    for step in range(STEPS):
        mean = [torch.stack(gs).mean(0) for gs in zip(*(grads(step, r) for r in range(world)))]
        for p, g in zip(params, mean):  # FSDP2 hands the optimizer already averaged gradients
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    return {"params": [p.full_tensor().detach().clone() for p in params], "path": opt.kernel_path,
            "local": [p.to_local().numel() for p in params[:3]]}


@needs_compiler
def test_compiled_dtensor_rows_match_one_process_foreach() -> None:
    world = 3
    results = run(dtensor_worker, world, timeout=420)
    params = make_params()
    train("adams", params, lambda step: [torch.stack(gs).mean(0) for gs in
                                         zip(*(grads(step, r) for r in range(world)))], kernel="foreach")
    for rank, res in enumerate(results):
        # (600, 192) and (384, 256) are compiled on every rank; Shard(0) gives the last rank 2 of the
        # 8 matrices (40, 320), few enough elements for foreach: both paths meet in one optimizer
        assert res["path"] == "compiled" and res["local"][0] >= COMPILED_MIN_NUMEL <= res["local"][2]
        for i, (a, b) in enumerate(zip(res["params"], params)):
            torch.testing.assert_close(a, b.detach(), rtol=2e-5, atol=2e-5, msg=lambda s, i=i: f"rank {rank} #{i}: {s}")


def _failing_compile(*args, **kwargs):
    raise RuntimeError("simulated: no working compiler")


def one_process(kernel: str) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = make_params()
    opt = train("adams", params, lambda step: grads(step, 0), kernel=kernel)
    return [p.detach().clone() for p in params], opt


def test_failed_compile_warns_and_takes_the_eager_path(monkeypatch) -> None:
    monkeypatch.setattr(rules.compiled, "_compiled_cache", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: _failing_compile)
    # "auto" resolving to compiled (as on CUDA) falls back with a warning instead of raising
    monkeypatch.setattr(rules.Rule, "kernel_path", lambda self, device, requested="auto": (
        "foreach" if requested == "foreach" else "compiled"))
    with pytest.warns(RuntimeWarning, match="compiled kernel unavailable.*simulated"):
        got, opt = one_process("auto")
    assert opt.kernel == "foreach" and opt.kernel_path == "foreach"  # and stays there
    expected, _ = one_process("foreach")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # nothing applied twice, nothing skipped


def test_failed_compile_raises_when_compiled_was_requested(monkeypatch) -> None:
    monkeypatch.setattr(rules.compiled, "_compiled_cache", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: _failing_compile)
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = adams_dist.Adams_ZeRO(params, lr=1e-2, kernel="compiled")
    for p, g in zip(params, grads(0, 0)):
        p.grad = g
    with pytest.raises(RuntimeError, match="kernel='compiled' was requested but torch.compile failed"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the failed step changed no weight
