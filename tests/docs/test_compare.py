"""examples/compare.py: a real --quick sweep in a subprocess, and the spike counter on synthetic losses."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "compare.py"


def load_compare():
    spec = importlib.util.spec_from_file_location("adams_dist_example_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_compare()

SANE_LR, HUGE_LR = 3e-3, 30.0


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--optimizers", "adamw", "adams"]
    cmd += ["--lrs", str(SANE_LR), str(HUGE_LR), "--steps", "30", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_quick_sweep_writes_every_output(quick_sweep):
    out, results = quick_sweep
    for name in ("results.json", "table.md", "lr_sweep.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("lr_sweep.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["complete"] is True
    assert results["config"]["steps"] == 30
    keys = sorted((r["optimizer"], r["lr"]) for r in results["runs"])
    assert keys == sorted((o, lr) for o in ("adamw", "adams") for lr in (SANE_LR, HUGE_LR))
    table = (out / "table.md").read_text()
    assert "| AdamW |" in table and "| Adams |" in table and "diverged" in table


def test_sane_lr_is_finite_and_learns(quick_sweep):
    _, results = quick_sweep
    for r in results["runs"]:
        if r["lr"] != SANE_LR:
            continue
        assert not r["diverged"], r["diverged_reason"]
        assert len(r["train_losses"]) == 30 and r["steps_done"] == 30
        assert all(v is not None and math.isfinite(v) for v in r["train_losses"])
        assert math.isfinite(r["final_eval_loss"])
        assert r["final_eval_loss"] < results["initial_eval_loss"]
        assert isinstance(r["spikes"], int) and r["spikes"] == len(r["spike_steps"])


def test_huge_lr_is_flagged_diverged(quick_sweep):
    out, results = quick_sweep
    (adamw_huge,) = [r for r in results["runs"] if r["optimizer"] == "adamw" and r["lr"] == HUGE_LR]
    assert adamw_huge["diverged"] is True
    assert adamw_huge["diverged_reason"]
    # the best lr is never a diverged one
    best = compare.best_runs(results["runs"])
    assert best["adamw"]["lr"] == SANE_LR


def test_spike_counter_flat_sequence_has_none():
    assert compare.count_spikes([2.0] * 100) == 0
    assert compare.count_spikes([]) == 0
    assert compare.count_spikes([2.0] * 5) == 0  # shorter than the window


def test_spike_counter_noise_and_decreasing_loss_have_none():
    noisy = [3.0 + 0.1 * math.sin(1.7 * t) for t in range(200)]  # +-3%: noise, not spikes
    assert compare.count_spikes(noisy) == 0
    falling = [5.5 * math.exp(-t / 50) + 2.0 for t in range(300)]
    assert compare.count_spikes(falling) == 0


def test_spike_counter_counts_one_injected_spike():
    losses = [2.0] * 100
    losses[60] = 3.0  # +50% over the running median
    assert compare.spike_steps(losses) == [60]
    assert compare.count_spikes(losses) == 1


def test_spike_counter_rule_details():
    base = [2.0] * 100
    at_threshold = list(base)
    at_threshold[50] = 2.0 * 1.25  # not strictly above (1 + 0.25) x median
    assert compare.count_spikes(at_threshold) == 0
    just_above = list(base)
    just_above[50] = 2.0 * 1.26
    assert compare.count_spikes(just_above) == 1
    early = list(base)
    early[10] = 10.0  # before a full window of history: not judged
    assert compare.count_spikes(early) == 0
    plateau = list(base)
    plateau[40:43] = [3.0, 3.0, 3.0]  # consecutive flagged steps are one spike
    assert compare.spike_steps(plateau) == [40]
    two = list(base)
    two[30], two[70] = 3.0, 3.0
    assert compare.spike_steps(two) == [30, 70]
    diverging = list(base)
    diverging[50:] = [float("nan")] * 50  # divergence is not counted as spikes
    assert compare.count_spikes(diverging) == 0
    assert compare.count_spikes([1.0] * 10 + [1.5] + [1.0] * 10, window=5, rel=0.4) == 1


def test_per_optimizer_lr_lists():
    args = compare.parse_args(
        ["--lrs", "1e-3", "--lrs-srf", "1e-6", "--lrs-sgd", "0.1", "--lrs-for", "adamw=5e-4,1e-2"]
    )
    assert compare.lr_list("adams", args) == [1e-3]
    assert compare.lr_list("adamw", args) == [5e-4, 1e-2]
    assert compare.lr_list("adamsrf", args) == [1e-6]
    assert compare.lr_list("homeadamew", args) == [1e-6]
    assert compare.lr_list("sgd", args) == [0.1]
    quick = compare.parse_args(["--quick", "--steps", "25"])
    assert quick.steps == 25 and quick.d_model == compare.QUICK["d_model"]
