"""moment_dtype="8bit" across sharding modes. Blocks are counted within each parameter's rows on a rank; the
layer sizes here put every shard boundary on a block boundary (multiples of 256 elements per rank), so ZeRO
and FSDP2 at W=2 quantize exactly as one process does and must match it to float32 rounding. A sharded
checkpoint resumes at W=2 and, re-blocked, at W=3. The one-process quantizer is checked against the float64
reference in tests/unit/test_rules_reference.py and tests/unit/test_quant8.py."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import adams_dist
from adams_dist.testing import run

STEPS, SAVE_AT = 6, 3


def _model() -> nn.Module:
    torch.manual_seed(0)  # (32, 64) and (16, 32): 1024 and 256 elements per rank at W=2, by rows or elements
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.Tanh(), nn.Linear(32, 16, bias=False))


def _batch(step: int, rank: int, world: int) -> torch.Tensor:
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(step))
    n = 12 // world
    return x[rank * n: (rank + 1) * n]


def _train(model: nn.Module, opt: Any, steps: range, rank: int, world: int) -> None:
    for step in steps:
        model(_batch(step, rank, world)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _zero(rank: int, world: int, rule: str, ckpt: str | None, load: bool) -> list[torch.Tensor]:
    model = _model()
    opt = adams_dist.create_optimizer(rule, model.named_parameters(), lr=1e-2, moment_dtype="8bit")
    assert all(s["exp_avg"].dtype == torch.int8 and s["exp_avg_sq"].dtype == torch.uint8 for s in opt.state.values())
    if load:
        assert ckpt is not None
        model.load_state_dict(torch.load(os.path.join(ckpt, "model.pt"), weights_only=True))
        adams_dist.load_sharded_optimizer(ckpt, opt)
        _train(model, opt, range(SAVE_AT, STEPS), rank, world)
        return _full(model)
    _train(model, opt, range(SAVE_AT), rank, world)
    if ckpt is not None:
        adams_dist.save_sharded_optimizer(ckpt, opt)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(ckpt, "model.pt"))
        if world > 1:
            dist.barrier()
    _train(model, opt, range(SAVE_AT, STEPS), rank, world)
    return _full(model)


def _fsdp(rank: int, world: int, rule: str) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = adams_dist.create_optimizer(rule, model.parameters(), lr=1e-2, moment_dtype="8bit")
    _train(model, opt, range(STEPS), rank, world)
    return _full(model)


def _close(got: list[torch.Tensor], want: list[torch.Tensor], what: str, tol: float = 1e-6) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m, i=i: f"{what}: param {i}: {m}")


@pytest.mark.parametrize("rule", ["adams", "adamw"])
def test_8bit_moments_in_every_sharding_mode_match_one_process(tmp_path, rule: str) -> None:
    one = _zero(0, 1, rule, None, False)
    unquantized = _model()  # the same run with float32 moments must differ: the option is not a no-op
    _train(unquantized, adams_dist.create_optimizer(rule, unquantized.parameters(), lr=1e-2), range(STEPS), 0, 1)
    assert max(float((a - b).abs().max()) for a, b in zip(one, _full(unquantized))) > 1e-5

    ckpt = str(tmp_path / "w2")
    for rank_result in run(_zero, 2, rule, ckpt, False, timeout=120):
        _close(rank_result, one, "ZeRO W=2")
    for rank_result in run(_zero, 2, rule, ckpt, True, timeout=120):
        _close(rank_result, one, "saved at W=2, resumed at W=2")
    # W=3 cuts other blocks: the moments are quantized again, each within a code of the W=2 run's. Each of the
    # 3 steps after it moves a weight by about lr = 1e-2 at most; a code changes a step by a fraction of that
    for rank_result in run(_zero, 3, rule, ckpt, True, timeout=120):
        _close(rank_result, one, "saved at W=2, resumed at W=3", tol=5e-3)
    if rule == "adams":
        for rank_result in run(_fsdp, 2, rule, timeout=120):
            _close(rank_result, one, "FSDP2 W=2")
