"""FSDP2 (fully_shard) parameters: local-row updates and exact spectral decay match one process."""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from adams_dist.testing import run
from rule_table import BY_NAME, hp_of

import adams_dist

VOCAB, D, HEADS, T, STEPS = 37, 16, 2, 8, 20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)  # no key bias: its true gradient is exactly zero
        self.proj = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 3 * D), nn.GELU(), nn.Linear(3 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, D // HEADS).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def mark(model: TinyGPT) -> None:
    """Optimizer attributes; set after fully_shard, which replaces the Parameter objects."""
    model.emb.weight.use_spectral_decay = False
    for block in model.blocks:
        adams_dist.set_heads(block.qkv.weight, 3 * HEADS)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, T + 1), generator=torch.Generator().manual_seed(1000 * step + rank))


def loss_of(model: nn.Module, b: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(b[:, :-1]).reshape(-1, VOCAB), b[:, 1:].reshape(-1))


HP = {name: dict(hp, max_grad_norm=1e3) for name, hp in hp_of("gpt").items()}  # the rules with a tiny-GPT set


def build_sharded(world: int, name: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = TinyGPT()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mark(model)
    return model, adams_dist.create_optimizer(name, model.parameters(), **HP[name])


def train_worker(rank: int, world: int, name: str) -> dict:
    model, opt = build_sharded(world, name)
    assert all(adams_dist.fsdp.is_dtensor(p) for p in model.parameters())
    collectives, norms = [], []
    for step in range(STEPS):
        loss_of(model, batch(step, rank)).backward()
        if step == 0:  # explicit clipping on DTensor gradients: ours vs torch's, both global
            torch_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1e9)
            norms = [float(opt.clip_grad_norm_(1e9)), float(torch_norm.full_tensor())]
        before = opt.collectives_issued
        opt.step()
        opt.zero_grad()
        collectives.append(opt.collectives_issued - before)
    sigmas = [s.clone() for s in opt.spectral_sigmas().values()]
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "sigmas": sigmas,
        "norm": float(opt.last_grad_norm),
        "collectives": collectives,
        "first_norms": norms,
    }


def reference(world: int, name: str):
    torch.manual_seed(0)
    model = TinyGPT()
    mark(model)
    opt = adams_dist.create_optimizer(name, model.parameters(), **HP[name])
    for step in range(STEPS):
        (sum(loss_of(model, batch(step, r)) for r in range(world)) / world).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(HP))
def test_fully_shard_matches_single_process(world: int, name: str) -> None:
    results = run(train_worker, world, name, timeout=300)
    model, opt = reference(world, name)
    expected = [p.detach() for p in model.parameters()]
    expected_sigmas = list(opt.spectral_sigmas().values())
    for rank, res in enumerate(results):
        for i, (got, exp) in enumerate(zip(res["params"], expected)):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=2e-5, msg=lambda m, i=i: f"rank {rank} p{i}: {m}")
        assert len(res["sigmas"]) == len(expected_sigmas)
        for got, exp in zip(res["sigmas"], expected_sigmas):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
        # clipping sees the true global norm of the averaged gradient
        assert res["norm"] == pytest.approx(float(opt.last_grad_norm), rel=1e-4)
        assert res["first_norms"][0] == pytest.approx(res["first_norms"][1], rel=1e-5)
        # the update itself communicates once per step (the control all-reduce), never per parameter
        assert set(res["collectives"]) == {1}
    if name == "adams":
        assert len(expected_sigmas) == 2 * 4 + 1  # qkv, proj, 2 MLP per block; the head; not the embedding
        assert all(float(s.min()) > 0 for s in expected_sigmas)


def dcp_save_worker(rank: int, world: int, path: str) -> list[torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    model, opt = build_sharded(world, "adams")
    for step in range(5):
        loss_of(model, batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    for step in range(5, 8):  # the continuation the resharded run must reproduce
        loss_of(model, batch(step, rank % 2)).backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def dcp_load_worker(rank: int, world: int, path: str) -> list[torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    model, opt = build_sharded(world, "adams")
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    for step in range(5, 8):
        # ranks 0-1 and 2-3 see the data ranks 0-1 saw, so the averaged gradient is the same
        loss_of(model, batch(step, rank % 2)).backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def test_dcp_checkpoint_reshards_2_to_4() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        expected = run(dcp_save_worker, 2, path, timeout=300)[0]
        results = run(dcp_load_worker, 4, path, timeout=300)
    for res in results:
        for got, exp in zip(res, expected):
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


DT_SHAPES = [(3, 5), (7, 5), (2, 3, 4), (13,), (9, 6), (5, 6)]


def dt_grad(step: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + sum(shape)))


def dt_params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(7)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in DT_SHAPES]
    return params


def distribute_tensor_worker(rank: int, world: int) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    params = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in dt_params()]
    adams_dist.set_heads(params[4], 3)
    adams_dist.set_heads(params[5], 3, dim=1)  # column heads: 5 rows over 4 ranks, u on every rank
    assert params[0].to_local().shape[0] == (0 if rank == 3 else 1)  # (3, 5) over 4 ranks: one rank is empty
    opt = adams_dist.Adams_ZeRO(params, lr=1e-2, weight_decay=0.5)
    for step in range(8):
        for p in params:  # gradients arrive already averaged, as FSDP2 delivers them
            p.grad = distribute_tensor(dt_grad(step, tuple(p.shape)), mesh, [Shard(0)])
        opt.step()
    return [p.full_tensor().detach().clone() for p in params] + list(opt.spectral_sigmas().values())


def test_distribute_tensor_params_with_uneven_and_empty_shards() -> None:
    results = run(distribute_tensor_worker, 4, timeout=300)
    params = dt_params()
    adams_dist.set_heads(params[4], 3)
    adams_dist.set_heads(params[5], 3, dim=1)
    opt = adams_dist.Adams_ZeRO(params, lr=1e-2, weight_decay=0.5)
    for step in range(8):
        for p in params:
            p.grad = dt_grad(step, tuple(p.shape))
        opt.step()
    expected = [p.detach() for p in params] + list(opt.spectral_sigmas().values())
    for res in results:
        assert len(res) == len(expected)
        for got, exp in zip(res, expected):
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


# HomeAdam's one decision per group needs the min of v_hat over the whole group, i.e. over every rank's rows.
HOME_SHAPES = [(4, 3), (6,), (2, 5)]
HOME_HP = BY_NAME["homeadam"].hp["dist"]  # tau = 0.5 lies between v_hat = 4 and v_hat = 0.0025


def home_grads(step: int) -> list[torch.Tensor]:
    """Magnitude 2 (v_hat = 4) everywhere but one element in row 3 of the first parameter (magnitude 0.05,
    v_hat = 0.0025): under Shard(0) at W = 2 that row is rank 1's, so only rank 1 holds the group's min."""
    g = torch.Generator().manual_seed(step)
    grads = [torch.where(torch.rand(s, generator=g) < 0.5, -2.0, 2.0) for s in HOME_SHAPES]
    grads[0][3, 1] *= 0.025
    return grads


def home_params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(11)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in HOME_SHAPES]


def home_train(params: list[nn.Parameter], grads_of, **hp) -> None:
    opt = adams_dist.HomeAdam(params, **{**HOME_HP, **hp})
    for step in range(5):
        for p, gr in zip(params, grads_of(step)):
            p.grad = gr
        opt.step()


def homeadam_dtensor_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for per_tensor in (False, True):
        params = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in home_params()]
        local_grads = [distribute_tensor(gr, mesh, [Shard(0)]).to_local() for gr in home_grads(0)]
        holds_min = any(bool((gr.abs() < 1).any()) for gr in local_grads)
        # gradients arrive already averaged, as FSDP2 delivers them
        home_train(params, lambda step: [distribute_tensor(gr, mesh, [Shard(0)]) for gr in home_grads(step)],
                   per_tensor=per_tensor)
        out[per_tensor] = {"params": [p.full_tensor().detach().clone() for p in params], "holds_min": holds_min}
    return out


@functools.cache
def homeadam_dtensor_results() -> list[dict]:
    return run(homeadam_dtensor_worker, 2, timeout=240)  # one spawn serves both cases below


@pytest.mark.parametrize("per_tensor", [False, True], ids=["group", "per_tensor"])
def test_homeadam_decision_over_dtensor_shards_is_global(per_tensor: bool) -> None:
    results = homeadam_dtensor_results()
    assert [r[per_tensor]["holds_min"] for r in results] == [False, True]  # the min lives on rank 1 only
    params = home_params()
    home_train(params, home_grads, per_tensor=per_tensor)  # one process: momentum-SGD (min v_hat < tau)
    srf = home_params()
    home_train(srf, home_grads, per_tensor=per_tensor, tau=1e-6)  # what a rank-local min would do on rank 0
    for rank, res in enumerate(results):
        for i, (got, exp) in enumerate(zip(res[per_tensor]["params"], params)):
            torch.testing.assert_close(got, exp.detach(), rtol=1e-5, atol=1e-6, msg=lambda s, i=i, r=rank:
                                       f"rank {r} param {i}: {s}")
    # the two branches differ on rank 0's rows of the first parameter (rows 0-1), so the check has teeth
    assert float((params[0] - srf[0]).detach()[:2].abs().max()) > 1e-3
