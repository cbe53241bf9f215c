"""HSDP (fully_shard on a 2x2 ("replicate", "shard") mesh): the update matches one process, replicas stay
bitwise identical, clipping sees the true norm, and a sharded checkpoint moves to FSDP2 at W=2."""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from adams_dist.testing import run
from rule_table import BY_NAME

import adams_dist

STEPS, CLIP = 6, 0.1
HP = {name: dict(BY_NAME[name].hp["dist"], max_grad_norm=CLIP) for name in ("adams", "adamw", "homeadam")}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 7)  # 7 rows: uneven shards (4 + 3)
        self.ln = nn.LayerNorm(7)
        self.qkv = nn.Linear(7, 12, bias=False)  # 3 heads of 4 rows: the middle head straddles the shards
        self.out = nn.Linear(12, 5)  # 5 rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.qkv(self.ln(torch.tanh(self.inp(x))))))


def mark(model: Net) -> None:
    """Optimizer attributes; set after fully_shard, which replaces the Parameter objects."""
    adams_dist.set_heads(model.qkv.weight, 3)
    adams_dist.set_heads(model.out.weight, 3, dim=1)  # 3 heads of (4, 5): column blocks, u on every rank


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)


def loss_of(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(b[0]), b[1])


def build(mesh_shape: tuple[int, ...], name: str, **hp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = Net()
    fully_shard(model, mesh=mesh)
    mark(model)
    return model, adams_dist.create_optimizer(name, model.parameters(), **{**HP[name], **hp})


def submesh_part() -> dict:
    """HSDP on the ("replicate", "shard") part of a 3-D mesh: each "pp" stage trains its own copy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world_mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "replicate", "shard"))
    mesh = world_mesh["replicate", "shard"]
    torch.manual_seed(0)
    model = Net()
    fully_shard(model, mesh=mesh)
    mark(model)
    adams_dist.AdamW(model.parameters(), lr=1e-3)  # a second optimizer on the same mesh reuses its group
    opt = adams_dist.Adams_ZeRO(model.parameters(), **HP["adams"])
    for step in range(3):
        loss_of(model, batch(step, mesh.get_local_rank("shard"))).backward()
        opt.step()
        opt.zero_grad()
    return {"world": opt.world_size, "norm": float(opt.last_grad_norm),
            "params": [p.full_tensor().detach().clone() for p in model.parameters()]}


def train_worker(rank: int, world: int) -> dict:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out: dict = {}
    for name in HP:
        model, opt = build((2, 2), name)
        assert all(tuple(p.placements) == (Replicate(), Shard(0)) for p in model.parameters())
        first_norm, collectives = 0.0, []
        for step in range(STEPS):
            loss_of(model, batch(step, rank)).backward()
            if step == 0:  # explicit clipping, with a limit that does not bind: the norm alone
                first_norm = float(opt.clip_grad_norm_(1e9))
            before = opt.collectives_issued
            opt.step()
            opt.zero_grad()
            collectives.append(opt.collectives_issued - before)
        out[name] = {
            "params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "local": [p.to_local().detach().clone() for p in model.parameters()]
            + [t.clone() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)],
            "sigmas": [s.clone() for s in opt.spectral_sigmas().values()],
            "norm": float(opt.last_grad_norm), "first_norm": first_norm, "collectives": collectives,
        }
    # a layout that splits a matrix's inner dim is refused, naming what spectral decay needs
    mesh = model.inp.weight.device_mesh
    p = nn.Parameter(distribute_tensor(torch.zeros(2, 4, 4), mesh, [Replicate(), Shard(1)]))
    try:
        adams_dist.Adams_ZeRO([p], lr=1e-3)
        out["refusal"] = ""
    except ValueError as e:
        out["refusal"] = str(e)
    out["submesh"] = submesh_part()
    return out


def reference(name: str) -> tuple[Net, torch.optim.Optimizer, float]:
    torch.manual_seed(0)
    model = Net()
    mark(model)
    opt = adams_dist.create_optimizer(name, model.parameters(), **HP[name])
    first_norm = 0.0
    for step in range(STEPS):
        (sum(loss_of(model, batch(step, r)) for r in range(4)) / 4).backward()
        if step == 0:
            first_norm = float(opt.clip_grad_norm_(1e9))
        opt.step()
        opt.zero_grad()
    return model, opt, first_norm


@functools.cache
def hsdp_results() -> list[dict]:
    return run(train_worker, 4, timeout=240)  # one spawn serves every rule


@pytest.mark.parametrize("name", list(HP))
def test_hsdp_matches_single_process(name: str) -> None:
    results = hsdp_results()
    model, opt, first_norm = reference(name)
    expected = [p.detach() for p in model.parameters()]
    assert opt.last_grad_norm is not None and float(opt.last_grad_norm) > 2 * CLIP  # the clipping binds
    for rank, res in enumerate(r[name] for r in results):
        for i, (got, exp) in enumerate(zip(res["params"], expected)):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=2e-5, msg=lambda m, i=i: f"rank {rank} p{i}: {m}")
        assert res["norm"] == pytest.approx(float(opt.last_grad_norm), rel=1e-5)
        assert res["first_norm"] == pytest.approx(first_norm, rel=1e-5)
        # the control all-reduce (and HomeAdam's min of v_hat), over the whole mesh
        assert set(res["collectives"]) == {2 if name == "homeadam" else 1}
        if name == "adams":  # sums over rows counted once: the replicas' rows are not added twice
            assert len(res["sigmas"]) == 3
            for got, exp in zip(res["sigmas"], opt.spectral_sigmas().values()):
                torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    # ranks 0 and 2 (1 and 3) hold the same shard in the two replicas: bit for bit the same rows and state
    for a, b in ((0, 2), (1, 3)):
        for x, y in zip(results[a][name]["local"], results[b][name]["local"], strict=True):
            assert torch.equal(x, y)


def test_layouts_splitting_matrix_rows_inside_are_refused() -> None:
    message = hsdp_results()[0]["refusal"]
    assert "placements" in message and "needs whole rows of each matrix" in message


def test_hsdp_on_part_of_a_larger_mesh() -> None:
    results = [r["submesh"] for r in hsdp_results()]
    torch.manual_seed(0)
    model = Net()
    mark(model)
    opt = adams_dist.Adams_ZeRO(model.parameters(), **HP["adams"])
    for step in range(3):
        (sum(loss_of(model, batch(step, r)) for r in range(2)) / 2).backward()
        opt.step()
        opt.zero_grad()
    for res in results:
        assert res["world"] == 2  # the optimizer's group: the 2 ranks of its stage, not all 4
        assert res["norm"] == pytest.approx(float(opt.last_grad_norm), rel=1e-5)
        for got, exp in zip(res["params"], model.parameters(), strict=True):
            torch.testing.assert_close(got, exp.detach(), rtol=1e-4, atol=2e-5)


def resume_worker(rank: int, world: int, path: str, load: str | None, steps: tuple[int, int, int],
                  save: str | None) -> dict:
    """HSDP 2x2 at W=4, FSDP2 at W=2: load ``load`` (if any), train ``steps[0]``..``steps[1]``, save to
    ``save`` (if any), train on to ``steps[2]``. Every run averages the gradients of batches 0 and 1."""
    import torch.distributed.checkpoint as dcp

    model, opt = build((2, 2) if world == 4 else (2,), "adams", max_grad_norm=None)
    if load is not None:
        state = model.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(path, load, "model"))
        model.load_state_dict(state)
        adams_dist.load_sharded_optimizer(os.path.join(path, load, "optim"), opt)
    def train(first: int, stop: int) -> None:
        for step in range(first, stop):
            loss_of(model, batch(step, rank % 2)).backward()
            opt.step()
            opt.zero_grad()

    train(steps[0], steps[1])
    out = {"mid": [p.full_tensor().detach().clone() for p in model.parameters()]}
    if save is not None:
        adams_dist.save_sharded_optimizer(os.path.join(path, save, "optim"), opt)
        dcp.save(model.state_dict(), checkpoint_id=os.path.join(path, save, "model"))
    train(steps[1], steps[2])
    out["end"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    out["local"] = ([p.to_local().detach().clone() for p in model.parameters()]
                    + [t.clone() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)])
    return out


def test_sharded_checkpoint_moves_between_hsdp_and_fsdp() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hsdp = run(resume_worker, 4, tmp, None, (0, 3, 6), "hsdp", timeout=240)
        fsdp = run(resume_worker, 2, tmp, "hsdp", (3, 6, 9), "fsdp", timeout=240)
        back = run(resume_worker, 4, tmp, "fsdp", (6, 9, 9), None, timeout=240)
    # HSDP -> FSDP2 at W=2 continues as the uninterrupted HSDP run, and FSDP2 -> HSDP as the FSDP2 run
    for got_run, exp in ((fsdp, hsdp[0]["end"]), (back, fsdp[0]["end"])):
        for res in got_run:
            for got, want in zip(res["mid"], exp, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in ((0, 2), (1, 3)):  # both replicas loaded the same rows and state
        for x, y in zip(back[a]["local"], back[b]["local"], strict=True):
            assert torch.equal(x, y)
