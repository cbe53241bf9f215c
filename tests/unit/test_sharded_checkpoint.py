"""Sharded (DCP) optimizer checkpoints in one process: exact resume for every rule, clear errors.

The multi-process cases (each rank writing its own rows, resharding 2 -> 3, 1 -> 2, 4 -> 1) live in
tests/dist/test_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rule_table import hp_of
from torch import nn

import adams_dist

RULES = hp_of("dist")


def make(rule: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model.register_parameter("heads", nn.Parameter(torch.randn(2, 3, 4)))  # a batched matrix (3-D state)
    return model, adams_dist.create_optimizer(rule, model.parameters(), **RULES[rule])


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
        loss = model(x).square().mean() + model.heads.sin().sum()  # type: ignore[operator]
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("rule", list(RULES))
def test_sharded_save_resumes_exactly(tmp_path: Path, rule: str) -> None:
    model, opt = make(rule, 0)
    train(model, opt, 0, 3)
    adams_dist.save_sharded_optimizer(tmp_path / "ckpt", opt)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, 3, 3)

    model2, opt2 = make(rule, 1)
    model2.load_state_dict(weights)
    adams_dist.load_sharded_optimizer(tmp_path / "ckpt", opt2)
    train(model2, opt2, 3, 3)
    for (name, want), got in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(got, want), f"{rule}: {name} differs after resuming"


def test_missing_or_incomplete_directory_raises_before_any_change(tmp_path: Path) -> None:
    model, opt = make("adams", 0)
    train(model, opt, 0, 1)
    before = opt.state_dict()
    (tmp_path / "half").mkdir()  # a save that died before DCP wrote its metadata
    for directory in (tmp_path / "missing", tmp_path / "half"):
        with pytest.raises(FileNotFoundError, match="no completed sharded checkpoint"):
            adams_dist.load_sharded_optimizer(directory, opt)
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i]["exp_avg"], e["exp_avg"]) for i, e in before["state"].items())


def test_sharded_checkpoint_of_another_optimizer_is_refused(tmp_path: Path) -> None:
    model, opt = make("adams", 0)
    train(model, opt, 0, 1)
    adams_dist.save_sharded_optimizer(tmp_path / "adams", opt)
    _, adamw = make("adamw", 0)
    with pytest.raises((ValueError, RuntimeError), match="Adams"):
        adams_dist.load_sharded_optimizer(tmp_path / "adams", adamw)
    with pytest.raises(TypeError, match="adams_dist optimizer"):
        adams_dist.save_sharded_optimizer(tmp_path / "torch", torch.optim.AdamW(model.parameters()))
