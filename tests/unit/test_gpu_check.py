"""scripts/gpu_check.sh in its CPU-only mode: every check runs and lands in the JSON, and a wrong result fails it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = {"adams", "adamatan2", "adamw", "adamsrf", "homeadam", "homeadamew"}


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-only", "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=240)


def test_cpu_only_run_writes_every_check(tmp_path: Path) -> None:
    proc = _run(tmp_path / "x.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "x.json").read_text())
    assert report["mode"] == "cpu-only" and report["ok"] is True
    checked = {(r["rule"], r["dtype"]) for r in report["parity"]}
    assert checked == {(r, d) for r in RULES for d in ("float32", "bfloat16")}
    assert all(r["ok"] and r["max_rel_err"] < 1e-5 for r in report["parity"])
    timing = report["timing"][0]["rows"]
    assert timing["torch AdamW fused"]["vs_fused_adamw"] == 1.0
    assert all(row["step_ms"] > 0 for row in timing.values())
    state = {name: row["state_bytes_per_param"] for name, row in timing.items()}
    assert 0 < state["Adams_ZeRO bf16 moments"] < state["Adams_ZeRO auto"]
    assert report["amp"]["ok"] and report["amp"]["skipped_steps"] == 1
    assert report["smoke"] == {"backend": "gloo", "max_abs_diff": 0.0, "ok": True}


def test_a_wrong_result_fails_the_check(tmp_path: Path) -> None:
    proc = _run(tmp_path / "x.json", "--inject-error", "1e-3")
    assert proc.returncode == 1, proc.stdout[-2000:]
    report = json.loads((tmp_path / "x.json").read_text())
    assert report["ok"] is False and not any(r["ok"] for r in report["parity"])
    assert "FAILED" in proc.stdout
