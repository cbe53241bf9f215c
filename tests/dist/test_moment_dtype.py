"""Stored moments in less precision, in every sharding mode: ZeRO and FSDP2 at W=2 match one process, and
sharded checkpoints resume across world sizes. The one-process rounding (bf16) and quantizer (8bit) are
checked against the float64 reference in tests/unit/test_rules_reference.py and tests/unit/test_quant8.py.

8bit blocks are counted within each parameter's rows on a rank; its layer sizes put every shard boundary
at W=2 on a block boundary (multiples of 256 elements per rank), so W=2 quantizes exactly as one process
does and must match it to float32 rounding; W=3 cuts other blocks.
"""

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
MOMENT = {"bf16": BF16, "8bit": "8bit", "8bit compiled": "8bit"}
STORED = {"bf16": (BF16, BF16), "8bit": (torch.int8, torch.uint8), "8bit compiled": (torch.int8, torch.uint8)}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "8bit compiled":  # (258, 256): 129 rows of one block per rank at W=2, over COMPILED_MIN_NUMEL
        return nn.Sequential(nn.Linear(64, 256, bias=False), nn.Tanh(), nn.Linear(256, 258, bias=False))
    if kind == "8bit":  # (32, 64) and (16, 32): 1024 and 256 elements per rank at W=2, by rows or elements
        return nn.Sequential(nn.Linear(64, 32, bias=False), nn.Tanh(), nn.Linear(32, 16, bias=False))
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3))


def _train(model: nn.Module, opt: Any, steps: range, rank: int, world: int) -> None:
    n_in = next(model.parameters()).shape[1]
    for step in steps:
        x = torch.randn(12, n_in, generator=torch.Generator().manual_seed(step))
        n = 12 // world
        # One process sums the two half-batch gradients of the W=2 ranks, as their all-reduce does, so that the
        # runs compared match bit for bit: a full-batch backward rounds differently (on some hosts' matmul
        # kernels), and an 8-bit moment near a code midpoint turns that rounding into a different code.
        parts = 2 if world == 1 else 1
        for half in x[rank * n: (rank + 1) * n].chunk(parts):
            (model(half).square().mean() / parts).backward()
        opt.step()
        opt.zero_grad()


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _optimizer(rule: str, params: Any, kind: str) -> Any:
    kernel = "compiled" if kind.endswith("compiled") else "auto"
    return adams_dist.create_optimizer(rule, params, lr=1e-2, moment_dtype=MOMENT[kind], kernel=kernel)


def _check_stored(opt: Any, kind: str) -> None:
    m_dtype, v_dtype = STORED[kind]
    for s in opt.state.values():
        assert s["exp_avg"].dtype == m_dtype and s.get("exp_avg_sq", torch.empty(0, dtype=v_dtype)).dtype == v_dtype


def _check_fused(kind: str) -> None:
    """Under kernel="compiled" the big weight took the fused 8-bit kernel (rules/compiled.py), not the eager path."""
    from adams_dist.rules import compiled

    assert kind != "8bit compiled" or any(k[1] == "8bit" for k in compiled._compiled_cache)


def _zero(rank: int, world: int, rule: str, kind: str, ckpt: str | None, load: bool) -> list[torch.Tensor]:
    model = _model(kind)
    opt = _optimizer(rule, model.named_parameters(), kind)
    _check_stored(opt, kind)
    if load:
        assert ckpt is not None
        model.load_state_dict(torch.load(os.path.join(ckpt, "model.pt"), weights_only=True))
        adams_dist.load_sharded_optimizer(ckpt, opt)
        _train(model, opt, range(SAVE_AT, STEPS), rank, world)
        return _full(model)
    _train(model, opt, range(SAVE_AT), rank, world)
    _check_fused(kind)
    if ckpt is not None:
        adams_dist.save_sharded_optimizer(ckpt, opt)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(ckpt, "model.pt"))
        if world > 1:
            dist.barrier()
    _train(model, opt, range(SAVE_AT, STEPS), rank, world)
    return _full(model)


def _fsdp(rank: int, world: int, rule: str, kind: str) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(kind)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = _optimizer(rule, model.parameters(), kind)
    _check_stored(opt, kind)
    _train(model, opt, range(STEPS), rank, world)
    _check_fused(kind)
    return _full(model)


def _close(got: list[torch.Tensor], want: list[torch.Tensor], what: str, tol: float) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m, i=i: f"{what}: param {i}: {m}")


def _one_process(rule: str, kind: str, differs_by: float) -> list[torch.Tensor]:
    one = _zero(0, 1, rule, kind, None, False)
    plain = _model(kind)  # the same run with float32 moments must differ: the option is not a no-op
    _train(plain, adams_dist.create_optimizer(rule, plain.parameters(), lr=1e-2), range(STEPS), 0, 1)
    assert max(float((a - b).abs().max()) for a, b in zip(one, _full(plain))) > differs_by
    return one


@pytest.mark.parametrize("rule", ["adams", "homeadam"])
def test_bf16_moments_in_every_sharding_mode_match_one_process(tmp_path, rule: str) -> None:
    one = _one_process(rule, "bf16", 1e-6)
    ckpt = str(tmp_path / "w2")
    for rank_result in run(_zero, 2, rule, "bf16", ckpt, False, timeout=120):
        _close(rank_result, one, "ZeRO W=2", 1e-5)
    for rank_result in run(_zero, 3, rule, "bf16", ckpt, True, timeout=120):
        _close(rank_result, one, "saved at W=2, resumed at W=3", 1e-5)
    for rank_result in run(_fsdp, 2, rule, "bf16", timeout=120):
        _close(rank_result, one, "FSDP2 W=2", 1e-5)


@pytest.mark.parametrize("rule", ["adams", "adamatan2", "adamw"])
def test_8bit_moments_in_every_sharding_mode_match_one_process(tmp_path, rule: str) -> None:
    one = _one_process(rule, "8bit", 1e-5)
    ckpt = str(tmp_path / "w2")
    for rank_result in run(_zero, 2, rule, "8bit", ckpt, False, timeout=120):
        _close(rank_result, one, "ZeRO W=2", 1e-6)
    for rank_result in run(_zero, 2, rule, "8bit", ckpt, True, timeout=120):
        _close(rank_result, one, "saved at W=2, resumed at W=2", 1e-6)
    # W=3 cuts other blocks: the moments are quantized again, each within a code of the W=2 run's. Each of the
    # 3 steps after it moves a weight by about lr = 1e-2 at most; a code changes a step by a fraction of that
    for rank_result in run(_zero, 3, rule, "8bit", ckpt, True, timeout=120):
        _close(rank_result, one, "saved at W=2, resumed at W=3", 5e-3)
    if rule != "adamatan2":  # an atan2 rule and an eps rule
        for rank_result in run(_fsdp, 2, rule, "8bit", timeout=120):
            _close(rank_result, one, "FSDP2 W=2", 1e-6)


def _close_but_a_few(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    """Float32 rounding (a gradient summed over two ranks' halves of the batch) moves a few of the 82K moments
    across a code midpoint: those weights differ by a fraction of a step (lr = 1e-2), the rest not at all."""
    for i, (g, w) in enumerate(zip(got, want)):
        apart = (g - w).abs()
        assert float((apart > 1e-6).float().mean()) < 1e-3 and float(apart.max()) < 5e-3, f"{what}: param {i}"


def test_compiled_8bit_moments_in_zero_and_fsdp2_match_one_process(tmp_path) -> None:
    """The fused 8-bit kernel on row shards: at W=2 each rank holds whole blocks of the big weight, so ZeRO and
    FSDP2 quantize as one process does; resumed at W=3 from a W=2 checkpoint, within a code of it.

    AdamW: each of the 8 processes builds its kernel, and AdamW's builds in a fraction of an atan2 rule's time
    (Adams' took this test past 600 s on 2 busy cores). The atan2 rules' 8-bit kernels are checked against the
    eager 8-bit path in tests/unit/test_quant8_compiled.py, and sharded eagerly in the test above."""
    one = _one_process("adamw", "8bit compiled", 1e-5)
    ckpt = str(tmp_path / "w2")
    for rank_result in run(_zero, 2, "adamw", "8bit compiled", ckpt, False, timeout=300):
        _close_but_a_few(rank_result, one, "ZeRO W=2")
    for rank_result in run(_zero, 3, "adamw", "8bit compiled", ckpt, True, timeout=300):
        _close(rank_result, one, "saved at W=2, resumed at W=3", 5e-3)
    for rank_result in run(_fsdp, 2, "adamw", "8bit compiled", timeout=300):
        _close_but_a_few(rank_result, one, "FSDP2 W=2")
