"""ZeRO mode equals the single-process run on averaged gradients, for every rule, at W = 2, 3, 4."""

from __future__ import annotations

import pytest
import torch
from adams_dist.testing import run
from rule_table import hp_of

import adams_dist

RULES = hp_of("dist")  # rule name -> the multi-process tests' hyperparameters

SHAPES = [(7, 5), (3, 5, 7), (13,), (), (2, 1, 9), (6, 4), (11, 3), (5, 6)]
STEPS = 20


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    adams_dist.set_heads(params[5], 3)  # a (6, 4) weight seen as 3 heads of (2, 4)
    adams_dist.set_heads(params[7], 3, dim=1)  # a (5, 6) weight seen as 3 heads of (2, 5): its column blocks
    return params


def rank_grad(step: int, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + len(shape) + sum(shape))
    return torch.randn(shape, generator=g) * (1.0 + rank)


def train(name: str, params: list[torch.nn.Parameter], grads_for_step, **engine) -> torch.optim.Optimizer:
    opt = adams_dist.create_optimizer(name, [{"params": params[:3]}, {"params": params[3:], "lr": 5e-3}],
                                      **RULES[name], **engine)
    for step in range(STEPS):
        for p, g in zip(params, grads_for_step(step)):
            p.grad = g.to(p.dtype)
        opt.step()
        opt.zero_grad()
    return opt


def worker(rank: int, world: int, dtype: torch.dtype) -> dict:
    out = {}
    for name in RULES:
        params = make_params(dtype, seed=rank)  # different init per rank: rank 0's must win
        opt = train(name, params, lambda step: [rank_grad(step, rank, p.shape) for p in params], bucket_mb=1e-4)
        sd = opt.state_dict()
        out[name] = {
            "params": [p.detach().float().clone() for p in params],
            "masters": [sd["state"][i]["master_param"].clone() for i in range(len(params))],
            "sigmas": [s.clone() for s in opt.spectral_sigmas().values()],
            "state_bytes": opt.state_bytes(),
            "n_buckets": len(opt._shards.buckets),
        }
    return out


def single_process(name: str, world: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp32 run from rank 0's (rounded) start on the mean of the gradients the ranks saw."""
    params = [torch.nn.Parameter(p.detach().float()) for p in make_params(dtype, seed=0)]
    adams_dist.set_heads(params[5], 3)
    adams_dist.set_heads(params[7], 3, dim=1)

    def averaged(step):
        return [torch.stack([rank_grad(step, r, p.shape).to(dtype).float() for r in range(world)]).mean(0)
                for p in params]

    opt = train(name, params, averaged)
    return [p.detach().clone() for p in params], [s.clone() for s in opt.spectral_sigmas().values()]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_single_process(world: int, dtype: torch.dtype) -> None:
    results = run(worker, world, dtype, timeout=240)
    for name in RULES:
        expected, expected_sigmas = single_process(name, world, dtype)
        for rank, res in enumerate(results):
            got = res[name]
            for i, (m, e) in enumerate(zip(got["masters"], expected)):
                torch.testing.assert_close(m, e, rtol=2e-5, atol=2e-5,
                                           msg=lambda s, i=i, r=rank: f"{name} rank {r} param {i}: {s}")
            for p, e in zip(got["params"], expected):
                if dtype == torch.float32:
                    torch.testing.assert_close(p, e, rtol=2e-5, atol=2e-5)
                else:  # the model holds the fp32 master rounded to bf16
                    torch.testing.assert_close(p, e.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
            for s, e in zip(got["sigmas"], expected_sigmas):
                torch.testing.assert_close(s, e, rtol=1e-4, atol=1e-5)
            assert len(got["sigmas"]) == len(expected_sigmas)


def test_state_is_sharded() -> None:
    """Each rank holds about 1/W of the optimizer state: two fp32 moments (the fp32 master of fp32 parameters
    is the parameters' own rows, not a copy)."""
    full = sum(torch.Size(s).numel() for s in SHAPES) * 4 * 2
    for world in (2, 4):
        results = run(worker, world, torch.float32, timeout=240)
        per_rank = [r["adamw"]["state_bytes"] for r in results]
        assert full <= sum(per_rank) < 1.2 * full, (world, per_rank, full)  # nothing lost, no master copy
        assert max(per_rank) <= full / world * 1.6 + 64, (world, per_rank, full)


def strided_params(seed: int) -> list[torch.nn.Parameter]:
    """Parameters whose memory is not one contiguous block, as transposed or sliced weights are."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=g).t()),                 # (7, 5), transposed
              torch.nn.Parameter(torch.randn(3, 7, 5, generator=g).transpose(1, 2)),  # (3, 5, 7), per-head transposed
              torch.nn.Parameter(torch.randn(13, generator=g)),
              torch.nn.Parameter(torch.randn(6, 8, generator=g)[:, ::2])]             # (6, 4), every other column
    assert [p.is_contiguous() for p in params] == [False, False, True, False]
    return params


def strided_worker(rank: int, world: int) -> dict:
    out = {}
    for name in RULES:
        params = strided_params(seed=rank)  # different init per rank: rank 0's must win
        train(name, params, lambda step: [rank_grad(step, rank, p.shape) for p in params], bucket_mb=1e-4)
        out[name] = [(p.detach().clone(), p.stride()) for p in params]
    return out


def test_non_contiguous_params_match_single_process() -> None:
    """Every rank's non-contiguous parameters receive the gathered update, in their own layout."""
    world = 2
    results = run(strided_worker, world, timeout=240)
    start = strided_params(seed=0)
    for name in RULES:
        params = strided_params(seed=0)
        train(name, params, lambda step: [torch.stack([rank_grad(step, r, p.shape) for r in range(world)]).mean(0)
                                          for p in params])
        for rank, res in enumerate(results):
            for i, ((got, stride), p, p0) in enumerate(zip(res[name], params, start)):
                assert stride == p0.stride(), f"{name} rank {rank} param {i}: the layout changed"
                torch.testing.assert_close(got, p.detach(), rtol=2e-5, atol=2e-5,
                                           msg=lambda s, i=i, r=rank: f"{name} rank {r} param {i}: {s}")
        assert all(float((p - p0).detach().abs().max()) > 1e-3 for p, p0 in zip(params, start))  # all moved
