"""The training loops people write, at W=2 over gloo: rank mistakes raise on every rank, never hang or
pass silently; overlap mode is safe with user collectives and gradient edits between backward and step."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import adams_dist
from adams_dist.testing import run


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))


def _loss(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return model(torch.randn(4, 6, generator=g)).square().mean()


def _error(fn, *args) -> str:
    """The message of what ``fn`` raises ("no error" if nothing)."""
    try:
        fn(*args)
    except Exception as e:  # the tests check which error by its message
        return f"{type(e).__name__}: {e}"
    return "no error"


# ---------------------------------------------------------------------------------------------- rank mistakes


def _skipped_step(rank: int, world: int) -> str:
    model = _model()
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2, collective_timeout=30)

    def loop() -> None:
        for step in range(4):
            opt.zero_grad()
            _loss(model, rank, step).backward()
            if rank == 1 and step == 1:
                continue  # the mistake: a rank-dependent condition skips this rank's step
            opt.step()

    return _error(loop)


def test_a_skipped_step_raises_on_every_rank() -> None:
    errors = run(_skipped_step, 2, timeout=120)
    for rank, err in enumerate(errors):
        assert "ranks disagree" in err, (rank, err)
        assert "rank 0: 1 backward passes, 1 zero_grad() calls" in err, err
        assert "rank 1: 2 backward passes, 2 zero_grad() calls" in err, err


def _scheduler_on_one_rank(rank: int, world: int) -> str:
    model = _model()
    opt = adams_dist.AdamW(model.parameters(), lr=1e-2, collective_timeout=30)
    _loss(model, rank, 0).backward()
    if rank == 0:
        opt.param_groups[0]["lr"] = 5e-3  # e.g. a scheduler stepped on one rank only
    return _error(opt.step)


def test_hyperparameters_that_differ_between_ranks_raise_on_every_rank() -> None:
    for err in run(_scheduler_on_one_rank, 2, timeout=120):
        assert "ranks disagree" in err and "param groups" in err and "lr=0.005" in err, err


def _reordered(rank: int, world: int) -> str:
    torch.manual_seed(0)  # one seed: equal values on both ranks before rank 0's are broadcast
    layers = [nn.Linear(7, 7) for _ in range(3)]
    params = [p for layer in layers for p in layer.parameters()]
    if rank == 1:
        params = params[2:4] + params[0:2] + params[4:]  # same shapes, another order
    return _error(adams_dist.AdamW, params)


def test_parameters_in_another_order_raise_on_every_rank() -> None:
    for err in run(_reordered, 2, timeout=120):
        assert "rank 1 lists the optimizer's parameters in another order" in err, err


def _trained(rank: int, timeout: float) -> adams_dist.Adams_ZeRO:
    model = _model()
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2, collective_timeout=timeout)
    for step in range(2):
        _loss(model, rank, step).backward()
        opt.step()
        opt.zero_grad()
    return opt


def _state_dict_alone(rank: int, world: int) -> dict:
    opt = _trained(rank, timeout=3)
    if rank == 1:
        time.sleep(8)  # elsewhere, for longer than the timeout
        return {}
    started = time.monotonic()
    return {"error": _error(opt.state_dict), "seconds": time.monotonic() - started}


def test_state_dict_on_one_rank_raises_instead_of_hanging() -> None:
    got = run(_state_dict_alone, 2, timeout=120)[0]
    assert "CollectiveTimeout" in got["error"] and "consolidate_state_dict(to=0)" in got["error"], got
    assert got["seconds"] < 30


def _consolidated(rank: int, world: int) -> bool | None:
    opt = _trained(rank, timeout=30)
    everyone = opt.state_dict()  # on every rank (what accelerate and Lightning call) keeps working
    opt.consolidate_state_dict(to=0)
    dist.barrier()
    if rank != 0:
        return None
    alone = opt.state_dict()  # rank 0 alone, served without a collective
    return all(torch.equal(alone["state"][k][n], everyone["state"][k][n])
               for k in everyone["state"] for n in everyone["state"][k])


def test_consolidate_state_dict_serves_state_dict_on_one_rank() -> None:
    assert run(_consolidated, 2, timeout=120) == [True, None]


def _rank_leaves(rank: int, world: int) -> str:
    model = _model()
    opt = adams_dist.AdamW(model.parameters(), lr=1e-2, collective_timeout=2)
    for step in range(3):
        _loss(model, rank, step).backward()
        if rank == 1 and step == 2:
            time.sleep(6)  # rank 1 is elsewhere (e.g. evaluating) for longer than the timeout
            return "left"
        err = _error(opt.step)
        if err != "no error":
            return err
        opt.zero_grad()
    return "no error"


def test_a_collective_that_waits_too_long_names_the_operation_and_the_step() -> None:
    err, left = run(_rank_leaves, 2, timeout=120)
    assert left == "left"
    assert err.startswith("CollectiveTimeout") and "during step 3" in err and "waited more than 2 s" in err, err


# ---------------------------------------------------------------------------------------------- overlap


def _partly_used(rank: int, world: int, overlap: bool, edit: str) -> dict:
    """A model whose last layer gets a gradient on rank 0 only, a user all-reduce between backward and
    step, and (``edit``) a gradient edit after backward."""
    model = _model()
    extra = nn.Linear(3, 3)
    opt = adams_dist.Adams_ZeRO([*model.parameters(), *extra.parameters()], lr=1e-2, overlap=overlap,
                                bucket_mb=1e-4, collective_timeout=30)
    for step in range(3):
        loss = _loss(model, rank, step)
        if rank == 0:
            loss = loss + extra(model(torch.ones(1, 6))).sum()
        loss.backward()
        logged = loss.detach().clone()
        dist.all_reduce(logged)  # the user's loss logging, between backward and step
        if edit == "grad_none":
            model[0].bias.grad = None  # on every rank
        elif edit == "torch_clip_one_rank" and rank == 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    return {"params": [p.detach().clone() for p in [*model.parameters(), *extra.parameters()]]}


@pytest.mark.parametrize("edit", ["none", "grad_none", "torch_clip_one_rank"])
def test_overlap_with_a_user_collective_and_gradient_edits_matches_no_overlap(edit: str) -> None:
    with_overlap = run(_partly_used, 2, True, edit, timeout=120)
    without = run(_partly_used, 2, False, edit, timeout=120)
    for a, b in zip(with_overlap[0]["params"], without[0]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(with_overlap[0]["params"], with_overlap[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _zero_grad_on_one_rank(rank: int, world: int) -> str:
    model = _model()
    opt = adams_dist.AdamW(model.parameters(), lr=1e-2, overlap=True, collective_timeout=30)
    _loss(model, rank, 0).backward()
    if rank == 1:
        opt.zero_grad()  # one rank throws its gradients away after they were reduced
    return _error(opt.step)


def test_zero_grad_on_one_rank_after_backward_raises_on_every_rank() -> None:
    for err in run(_zero_grad_on_one_rank, 2, timeout=120):
        assert "ranks disagree" in err and "zero_grad() calls" in err, err


def _clip_on_one_rank(rank: int, world: int, overlap: bool) -> str:
    model = _model()
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2, overlap=overlap, collective_timeout=3)
    for step in range(2):
        _loss(model, rank, step).backward()
        err = _error(opt.clip_grad_norm_, 0.1) if rank == 1 and step == 1 else "no error"  # one rank alone
        err = _error(opt.step) if err == "no error" else err
        if err != "no error":
            # stay up past the other rank's 3 s timeout: a rank that exits first closes the connection, and
            # the other would see gloo's "connection closed" instead of its own CollectiveTimeout
            time.sleep(5)
            return err
        opt.zero_grad()
    return "no error"


@pytest.mark.parametrize("overlap", [False, True])
def test_optimizer_clip_on_one_rank_raises_on_every_rank(overlap: bool) -> None:
    on_step, on_clip = run(_clip_on_one_rank, 2, overlap, timeout=120)
    assert on_step.startswith("CollectiveTimeout") and "control all-reduce during step 2" in on_step, on_step
    assert on_clip.startswith("CollectiveTimeout") and "during clip_grad_norm_()" in on_clip, on_clip


def _replaced_optimizer(rank: int, world: int, replace: bool) -> list[torch.Tensor]:
    model = _model()
    if replace:  # e.g. a notebook cell run twice, or an lr finder before the real run
        adams_dist.AdamW(model.parameters(), lr=1e-2, overlap=True)
    opt = adams_dist.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        _loss(model, rank, step).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_a_dropped_optimizer_leaves_no_active_hooks() -> None:
    replaced, fresh = run(_replaced_optimizer, 2, True, timeout=120), run(_replaced_optimizer, 2, False, timeout=120)
    for a, b in zip(replaced[0], fresh[0]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- AMP


SCALERS = {"torch": torch.amp.GradScaler, "adams_dist": adams_dist.GradScaler}


def _amp(rank: int, world: int, scaler_kind: str | None, overlap: bool) -> dict:
    """Three steps; at the second, rank 1's gradients hold an inf. With a GradScaler every rank must skip
    that step; the reference run skips it by not running it at all."""
    model = _model()
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2, overlap=overlap, bucket_mb=1e-4,
                                collective_timeout=30)
    # powers of two: scaling and unscaling are exact, so the runs agree bit for bit
    scaler = SCALERS[scaler_kind]("cpu", init_scale=2.0**8, growth_interval=1) if scaler_kind else None
    scales = []
    for step in range(4):
        if step == 1 and not scaler_kind:
            continue
        loss = _loss(model, rank, step)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if step == 1 and rank == 1:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        opt.zero_grad()
    return {"params": [p.detach().clone() for p in model.parameters()], "scales": scales,
            "skipped": opt.skipped_steps, "steps": [int(opt.state[p]["step"]) for p in model.parameters()]}


@pytest.mark.parametrize("overlap", [False, True])
def test_grad_scaler_skips_the_same_step_on_every_rank(overlap: bool) -> None:
    amp = run(_amp, 2, "torch", overlap, timeout=120)
    reference = run(_amp, 2, None, False, timeout=120)
    for rank in range(2):
        assert amp[rank]["skipped"] == 1 and amp[rank]["steps"] == [3] * len(amp[rank]["steps"]), amp[rank]
        for a, b in zip(amp[rank]["params"], reference[0]["params"]):
            assert torch.equal(a, b)
    # the rank that saw the inf backed off; each rank unscales its own gradients, so scales may differ
    assert amp[1]["scales"][1] == amp[1]["scales"][0] / 2 and amp[0]["scales"][1] == amp[0]["scales"][0] * 2


def test_adams_dist_grad_scaler_keeps_one_scale_on_every_rank() -> None:
    amp = run(_amp, 2, "adams_dist", True, timeout=120)
    reference = run(_amp, 2, None, False, timeout=120)
    for rank in range(2):
        assert amp[rank]["skipped"] == 1
        for a, b in zip(amp[rank]["params"], reference[0]["params"]):
            assert torch.equal(a, b)
    # both ranks back off at the overflow on rank 1, then grow together (growth_interval=1)
    assert amp[0]["scales"] == amp[1]["scales"] == [2.0**9, 2.0**8, 2.0**9, 2.0**10], amp
