"""The master kept in bf16 parameters, at W=1 to 4, ZeRO and FSDP2, with sharded checkpoints that reshard.

``master_dtype=None`` (stochastic rounding, no master copy) and ``master_remainder=True`` (the fp32
master as the bf16 parameter plus an int16 remainder). Every rank feeds the same batch, so the averaged
gradient is exactly each rank's (sums of 2 or 4 equal values divide back exactly): the runs must then
agree bit for bit at every world size. Without a master, because each element is rounded by the rank
that owns it with bits drawn from its index in the whole parameter; with the remainder, because it
holds the very fp32 master a plain run keeps, so it must match that run too.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import adams_dist
from adams_dist.testing import run

BF16 = torch.bfloat16
STEPS, SAVE_AT = 6, 3
NO_MASTER = dict(lr=3e-3, master_dtype=None, moment_dtype=BF16, rounding_seed=5)
REMAINDER = dict(lr=3e-3, master_remainder=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 33), nn.Tanh(), nn.Linear(33, 5)).to(BF16)


def _train(model: nn.Module, opt: Any, steps: range) -> None:
    for step in steps:
        x = torch.randn(8, 9, generator=torch.Generator().manual_seed(step)).to(BF16)  # the same on every rank
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _zero(rank: int, world: int, ckpt: str, mode: str, options: dict[str, Any]) -> list[torch.Tensor]:
    model = _model()
    opt = adams_dist.Adams_ZeRO(model.named_parameters(), **options)
    if mode == "resume":
        model.load_state_dict(torch.load(os.path.join(ckpt, "model.pt"), weights_only=True))
        adams_dist.load_sharded_optimizer(ckpt, opt)
        _train(model, opt, range(SAVE_AT, STEPS))
        return _params(model)
    _train(model, opt, range(SAVE_AT))
    if mode == "save":
        adams_dist.save_sharded_optimizer(ckpt, opt)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(ckpt, "model.pt"))
        if world > 1:
            dist.barrier()
    _train(model, opt, range(SAVE_AT, STEPS))
    return _params(model)


def _fsdp(rank: int, world: int, options: dict[str, Any]) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = adams_dist.Adams_ZeRO(model.parameters(), **options)
    _train(model, opt, range(STEPS))
    return _params(model)


def _same(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == BF16 and torch.equal(g, w), f"{what}: param {i} differs by {(g.float() - w.float()).abs().max()}"


def _check_every_world_size(options: dict[str, Any], want: list[torch.Tensor], ckpt: str) -> None:
    for rank, got in enumerate(run(_zero, 2, ckpt, "save", options, timeout=120)):
        _same(got, want, f"ZeRO W=2, rank {rank}")
    for rank, got in enumerate(run(_zero, 4, ckpt, "resume", options, timeout=150)):
        _same(got, want, f"saved at W=2, resumed at W=4, rank {rank}")
    for rank, got in enumerate(run(_fsdp, 2, options, timeout=120)):
        _same(got, want, f"FSDP2 W=2, rank {rank}")


def test_no_master_runs_agree_bit_for_bit_at_every_world_size(tmp_path) -> None:
    one = _zero(0, 1, "", "plain", NO_MASTER)
    start = _params(_model())
    assert all(not torch.equal(a, b) for a, b in zip(one, start)), "a parameter never moved"
    _check_every_world_size(NO_MASTER, one, str(tmp_path / "w2"))


def test_master_remainder_equals_the_fp32_master_at_every_world_size(tmp_path) -> None:
    plain = _zero(0, 1, "", "plain", dict(lr=3e-3))  # fp32 master copy, bf16 parameters
    _same(_zero(0, 1, "", "plain", REMAINDER), plain, "one process")
    _check_every_world_size(REMAINDER, plain, str(tmp_path / "w2"))
