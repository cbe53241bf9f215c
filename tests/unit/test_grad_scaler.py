"""torch.amp.GradScaler in one process: the optimizer unscales the gradients itself and skips a step
whose gradients hold inf, as torch's fused optimizers do (``_step_supports_amp_scaling``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adams_dist


def _train(name: str, scaler: torch.amp.GradScaler | None, inf_at: int | None) -> tuple[list[torch.Tensor], int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = adams_dist.create_optimizer(name, model.parameters(), lr=1e-2)
    for step in range(4):
        loss = model(torch.randn(6, 5, generator=torch.Generator().manual_seed(step))).square().mean()
        if scaler is None:
            if step == inf_at:
                continue  # the reference skips that step
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if step == inf_at:
                model[2].bias.grad[0] = float("nan")
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt.skipped_steps


@pytest.mark.parametrize("name", ["adams", "adamw", "homeadam"])
def test_grad_scaler_matches_the_unscaled_run_and_skips_inf_steps(name: str) -> None:
    # powers of two: scaling and unscaling are exact, so the runs agree bit for bit
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    scaled, skipped = _train(name, scaler, inf_at=2)
    reference, _ = _train(name, None, inf_at=2)
    assert skipped == 1
    for a, b in zip(scaled, reference):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**12 * 2 * 2 / 2 * 2  # grew, grew, backed off at the inf, grew


def test_grad_scaler_with_fp16_autocast_trains() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(16, 8)
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (model(x) - x).square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
