"""torchtitan: the adams_dist optimizer container over FSDP2 (and tensor-parallel) parameters, checkpointed
through DCP.

A run saved after 3 of 6 steps with ``dcp.save`` (as torchtitan's CheckpointManager saves its Stateful
objects), then loaded into a freshly built model and container, ends where the uninterrupted run ends.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from adams_dist.testing import run
from frameworks import needs

import adams_dist

needs("torchtitan")

from torchtitan.components.optimizer import OptimizersContainer  # noqa: E402 - after the skip

from adams_dist.integrations.torchtitan import (  # noqa: E402
    AdamsOptimizersContainer,
    adams_config,
    build_adams_optimizers,
)

STEPS, SAVE_AT = 6, 3
HP = dict(lr=3e-2, weight_decay=0.1)
FLAT = "flatten_optimizer_state_dict"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


@dataclass(kw_only=True, slots=True)
class TrainerLike:  # the optimizer field of torchtitan's Trainer.Config (whose module needs triton)
    optimizer: OptimizersContainer.Config = field(default_factory=OptimizersContainer.Config)


def build(world: int, seed: int, name: str = "Adams", layout: str = "fsdp"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torchtitan.components.optimizer import LRSchedulersContainer

    torch.manual_seed(seed)
    model = Tiny()
    mesh = init_device_mesh("cpu", (world,))
    if layout == "tp":  # inp.weight Shard(0), out.weight Shard(1), out.bias Replicate()
        parallelize_module(model, mesh, {"inp": ColwiseParallel(), "out": RowwiseParallel()})
    else:
        fully_shard(model, mesh=mesh)
    optimizers = build_adams_optimizers([model], name, **HP)
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=STEPS)
    return model, optimizers, schedulers


def train(model, optimizers, schedulers, rank: int, steps: range) -> list[float]:
    # one batch per data-parallel rank (tensor-parallel ranks share one), so the loss falls step by step
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)
    losses = []
    for _ in steps:
        optimizers.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizers.step()
        schedulers.step()
        losses.append(loss.item())
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def _resume(rank: int, world: int, ckpt: str, layout: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torchtitan.components.checkpoint import ModelWrapper

    out: dict = {}
    rank = rank if layout == "fsdp" else 0  # the batch this rank trains on
    # Uninterrupted.
    model, optimizers, schedulers = build(world, seed=0, layout=layout)
    hooked: list[int] = []
    optimizers.register_step_pre_hook(lambda *args, **kwargs: hooked.append(1))  # as the MoE balancing hook
    out["straight"] = train(model, optimizers, schedulers, rank, range(STEPS))
    out["straight_params"] = full_params(model)
    out["hook_calls"] = len(hooked)
    out["kinds"] = [type(o).__name__ for o in optimizers]
    out["names"] = sorted(n for n, _ in model.named_parameters())
    out["keys"] = sorted(optimizers.state_dict())
    # torch's own helper over the same optimizer keys the state by the same names.
    sd = get_optimizer_state_dict(model, optimizers.optimizers[0], options=StateDictOptions(**{FLAT: True}))
    out["torch_keys"] = sorted(sd)
    twin_model, twin, _ = build(world, seed=1, layout=layout)
    try:
        set_optimizer_state_dict(twin_model, twin.optimizers[0], sd, options=StateDictOptions(**{FLAT: True}))
        out["torch_load_error"] = None
    except ValueError as e:  # see test_torch_set_optimizer_state_dict
        out["torch_load_error"] = str(e)
    out["torch_roundtrip"] = full_params(twin_model)
    # AdamW keeps no spectral state: its state dict goes through torch's helpers both ways.
    model, optimizers, schedulers = build(world, seed=0, name="AdamW", layout=layout)
    train(model, optimizers, schedulers, rank, range(2))
    sd = get_optimizer_state_dict(model, optimizers.optimizers[0], options=StateDictOptions(**{FLAT: True}))
    twin_model, twin, _ = build(world, seed=1, name="AdamW", layout=layout)
    set_optimizer_state_dict(twin_model, twin.optimizers[0], sd, options=StateDictOptions(**{FLAT: True}))
    out["adamw_params"], out["adamw_roundtrip"] = full_params(model), full_params(twin_model)

    # Saved after SAVE_AT steps, then loaded into a model and container built from another seed.
    model, optimizers, schedulers = build(world, seed=0, layout=layout)
    first = train(model, optimizers, schedulers, rank, range(SAVE_AT))
    states = {"model": ModelWrapper(model), "optimizer": optimizers, "lr_scheduler": schedulers}
    dcp.save(states, checkpoint_id=ckpt)
    model, optimizers, schedulers = build(world, seed=1, layout=layout)
    states = {"model": ModelWrapper(model), "optimizer": optimizers, "lr_scheduler": schedulers}
    dcp.load(states, checkpoint_id=ckpt)
    out["resumed"] = first + train(model, optimizers, schedulers, rank, range(SAVE_AT, STEPS))
    out["resumed_params"] = full_params(model)
    return out


@pytest.fixture(scope="module", params=["fsdp", "tp"])
def resumed(request: pytest.FixtureRequest) -> list[dict]:
    with tempfile.TemporaryDirectory() as ckpt:
        return run(_resume, 2, ckpt, request.param, timeout=120)


def test_container_holds_adams_dist_optimizers(resumed: list[dict]) -> None:
    for out in resumed:
        assert out["kinds"] == ["Adams_ZeRO"]
        assert out["hook_calls"] == STEPS


def test_flat_state_dict_is_keyed_by_parameter_name(resumed: list[dict]) -> None:
    out = resumed[0]
    state_names = {"step", "master_param", "exp_avg", "exp_avg_sq"}
    for keys in (out["keys"], out["torch_keys"]):
        fqns = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in keys}
        assert fqns == set(out["names"]), keys
        for name in out["names"]:
            assert {f"state.{name}.{s}" for s in state_names} <= set(keys)
            assert f"param_groups.{name}.lr" in keys
        assert all(k.startswith(("state.", "param_groups.")) for k in keys)


def test_resume_from_dcp_matches_an_uninterrupted_run(resumed: list[dict]) -> None:
    for out in resumed:
        assert out["resumed"] == out["straight"]
        assert out["straight"][-1] < out["straight"][0]  # it trains
        for name, p in out["straight_params"].items():
            torch.testing.assert_close(out["resumed_params"][name], p, rtol=0, atol=1e-6)


def test_torch_state_dict_helpers_load_adamw(resumed: list[dict]) -> None:
    for out in resumed:
        for name, p in out["adamw_params"].items():
            torch.testing.assert_close(out["adamw_roundtrip"][name], p, rtol=0, atol=0)


# torch's set_optimizer_state_dict builds each entry from the names in the live ``optim.state[param]`` and
# hands an empty dict for a name the flat dict lacks (Adams keeps "sigma_sq" there and saves "sigma").
def test_torch_set_optimizer_state_dict(resumed: list[dict]) -> None:
    for out in resumed:
        assert out["torch_load_error"] is None
        for name, p in out["straight_params"].items():
            # loading writes the saved master weights into the other model's parameters
            torch.testing.assert_close(out["torch_roundtrip"][name], p, rtol=0, atol=0)


def test_config_builds_the_container_and_rejects_misplaced_engine_options() -> None:
    model = Tiny()
    container = adams_config("AdamW", lr=1e-3, bucket_mb=8.0).build(model_parts=[model])
    assert isinstance(container, AdamsOptimizersContainer)
    (opt,) = container.optimizers
    assert isinstance(opt, adams_dist.AdamW) and opt.bucket_mb == 8.0
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    config = adams_config("Adams", lr=1e-3)
    config.param_groups[0].optimizer_kwargs["max_grad_norm"] = 1.0
    with pytest.raises(ValueError, match="engine options"):
        config.build(model_parts=[model])
    with pytest.raises(ValueError, match="unknown optimizer"):
        adams_config("Lamb").build(model_parts=[model])


def test_trainer_config_keeps_the_adams_config() -> None:
    """torchtitan parses the trainer config (and command-line overrides) with tyro; the subclass survives."""
    tyro = needs("tyro")
    from torchtitan.config.manager import custom_registry

    default = TrainerLike(optimizer=adams_config("Adams", lr=8e-4, bucket_mb=8.0))
    config = tyro.cli(TrainerLike, args=["--optimizer.implementation", "foreach"], default=default,
                      registry=custom_registry)
    assert type(config.optimizer) is AdamsOptimizersContainer.Config
    assert config.optimizer.param_groups[0].optimizer_kwargs == {"lr": 8e-4}
    assert config.optimizer.optimizer_factory_kwargs_by_name == {"Adams": {"bucket_mb": 8.0}}
