"""Two torchrun "nodes" of 2 processes each (launch/train_multinode.sh, c10d rendezvous on 127.0.0.1)
train exactly as one standalone torchrun of 4 processes (launch/train_cpu.sh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from adams_dist.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--block-size", "32", "--batch-size", "4",
        "--steps", "8", "--warmup", "2", "--eval-every", "8", "--eval-batches", "4", "--log-every", "1",
        "--data-bytes", "200000"]
TIMEOUT_S = 240


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **extra}


def _start(script: str, out_dir: Path, **env: str) -> subprocess.Popen:
    cmd = ["bash", str(ROOT / "launch" / script), *ARGS, "--out-dir", str(out_dir)]
    return subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: killed whole on failure


def _finish(procs: list[subprocess.Popen], what: str) -> None:
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not finish within {TIMEOUT_S} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"{what} failed (exit {p.returncode}):\n{out[-3000:]}"


def _losses(out_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r[k]) for r in rows for k in ("train_loss", "eval_loss") if k in r]
    config = next(r for r in rows if r.get("event") == "config")
    assert config["world_size"] == 4, config
    return losses


def test_two_nodes_of_two_equal_four_processes_on_one_node(tmp_path: Path) -> None:
    _finish([_start("train_cpu.sh", tmp_path / "standalone", NPROC="4")], "the standalone run")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [_start("train_multinode.sh", tmp_path / f"node{rank}", NNODES="2", NODE_RANK=str(rank),
                    NPROC_PER_NODE="2", RDZV_ENDPOINT=endpoint, RDZV_ID="test", RDZV_TIMEOUT="120")
             for rank in (0, 1)]
    _finish(nodes, "the two-node run")
    # rank 0 writes the metrics: it lives on whichever node joined the rendezvous first
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if (d / "metrics.jsonl").exists()]
    assert len(written) == 1, written
    want, got = _losses(tmp_path / "standalone"), _losses(written[0])
    assert len(want) >= 9 and [s for s, _ in got] == [s for s, _ in want]
    assert got == want, f"two nodes {got} != one node {want}"
