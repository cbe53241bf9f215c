"""moment_dtype=torch.bfloat16 in every sharding mode: ZeRO at W=2 and 3 and FSDP2 at W=2 match one process,
and sharded checkpoints resume across world sizes. The one-process rounding itself is checked against the
float64 reference in tests/unit/test_rules_reference.py."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import adams_dist
from adams_dist.testing import run

BF16 = torch.bfloat16
STEPS, SAVE_AT = 6, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch(step: int, rank: int, world: int) -> torch.Tensor:
    x = torch.randn(12, 7, generator=torch.Generator().manual_seed(step))
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
    opt = adams_dist.create_optimizer(rule, model.named_parameters(), lr=1e-2, moment_dtype=BF16)
    assert all(s["exp_avg"].dtype == BF16 for s in opt.state.values())
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
    opt = adams_dist.create_optimizer(rule, model.parameters(), lr=1e-2, moment_dtype=BF16)
    assert all(s["exp_avg"].dtype == BF16 for s in opt.state.values())
    _train(model, opt, range(STEPS), rank, world)
    return _full(model)


def _close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"{what}: param {i}: {m}")


@pytest.mark.parametrize("rule", ["adams", "homeadam"])
def test_bf16_moments_in_every_sharding_mode_match_one_process(tmp_path, rule: str) -> None:
    one = _zero(0, 1, rule, None, False)
    unrounded = _model()  # the same run with float32 moments must differ: the option is not a no-op
    _train(unrounded, adams_dist.create_optimizer(rule, unrounded.parameters(), lr=1e-2), range(STEPS), 0, 1)
    assert max(float((a - b).abs().max()) for a, b in zip(one, _full(unrounded))) > 1e-6

    ckpt = str(tmp_path / "w2")
    for rank_result in run(_zero, 2, rule, ckpt, False, timeout=120):
        _close(rank_result, one, "ZeRO W=2")
    for rank_result in run(_zero, 3, rule, ckpt, True, timeout=120):
        _close(rank_result, one, "saved at W=2, resumed at W=3")
    for rank_result in run(_fsdp, 2, rule, timeout=120):
        _close(rank_result, one, "FSDP2 W=2")
