"""End to end: kill one rank of a torchrun training run, rerun the same command, finish as if never killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--n-layer", "1", "--n-head", "2", "--d-model", "64", "--block-size", "64", "--batch-size", "8",
        "--steps", "40", "--warmup", "5", "--ckpt-every", "10", "--eval-every", "20", "--eval-batches", "2",
        "--log-every", "5", "--data-bytes", "300000", "--resume"]
FINAL = re.compile(r"final eval loss (\d+\.\d+)")


def command(out_dir: Path) -> list[str]:
    return ["bash", str(ROOT / "launch" / "train_cpu.sh"), *ARGS, "--out-dir", str(out_dir)]


def env() -> dict[str, str]:
    return {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "TQDM_DISABLE": "1"}


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (read from /proc; no extra dependency)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def test_kill_one_rank_then_rerun_resumes_and_matches(tmp_path: Path) -> None:
    clean = subprocess.run(command(tmp_path / "clean"), env=env(), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    expected = FINAL.search(clean.stdout)
    assert expected, clean.stdout[-2000:]

    out = tmp_path / "crashy"
    ckpt = out / "ckpt.pt"
    run = subprocess.Popen(command(out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists():  # the first checkpoint (step 10) is on disk: now kill a rank mid-run
            assert run.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared within 240 s"
            time.sleep(0.02)
        workers = children(run.pid)  # bash exec'd torchrun, so run.pid is the torchrun agent itself
        assert workers, "no worker processes found under torchrun"
        os.kill(sorted(workers)[-1], signal.SIGKILL)
        crashed_output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0, "the killed run reported success:\n" + crashed_output[-2000:]
    assert not FINAL.search(crashed_output), "the run finished before the kill; the test proved nothing"

    again = subprocess.run(command(out), env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = re.search(r"resumed from .* at step (\d+)", again.stdout)
    assert resumed and 10 <= int(resumed.group(1)) < 40, again.stdout[-2000:]
    got = FINAL.search(again.stdout)
    assert got and got.group(1) == expected.group(1), (got and got.group(1), expected.group(1))
