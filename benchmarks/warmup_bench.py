"""The first minute of training with each kernel path: every step's time, one process, CPU.

    python benchmarks/warmup_bench.py [--size 2e7] [--seconds 60] [--threads 1]

Runs the same optimizer set-up (``common.param_mix``, gradients preset) for ``--seconds`` of wall time
(and at least 21 steps) per path, one path after the other, each in a fresh process with its own fresh
inductor cache (a cold compile, as on a new machine): ``kernel="foreach"`` (the default on CPU),
``"compiled"`` (compiles in the first step) and ``"background"`` (eager steps while a thread builds the
compiled kernels). Reports the first step, the longest step, when the steps reached compiled speed (within
10% of the compiled path's median) and the median of the last 20 steps, against torch's fused AdamW timed
in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import machine, param_mix, save, table

import adams_dist

PATHS = ("foreach", "compiled", "background")
MIN_STEPS = 21  # the first step and the 20 whose median is reported


def run_one(kernel: str, size: float, seconds: float, threads: int) -> dict:
    """One path in this process: per-step times for ``seconds``, then fused AdamW's step for scale."""
    torch.set_num_threads(threads)
    params = param_mix(int(size))
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt = adams_dist.Adams_ZeRO(params, kernel=kernel)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < MIN_STEPS:  # a cold build may outlast seconds
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    fused = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], fused=True)
    for q, p in zip((q for g in fused.param_groups for q in g["params"]), params):
        q.grad = p.grad.clone()
    fused_times = []
    for _ in range(12):
        t0 = time.perf_counter()
        fused.step()
        fused_times.append(time.perf_counter() - t0)
    return {"kernel": kernel, "times": times, "fused_ms": statistics.median(fused_times[2:]) * 1e3,
            "params": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=2e7)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size, args.seconds, args.threads)))
        return
    results = {}
    for kernel in PATHS:
        with tempfile.TemporaryDirectory() as cache:
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run([sys.executable, __file__, "--one", kernel, "--size", str(args.size),
                                  "--seconds", str(args.seconds), "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            results[kernel] = json.loads(out.strip().splitlines()[-1])
    compiled_ms = statistics.median(results["compiled"]["times"][1:]) * 1e3
    rows = []
    for kernel, r in results.items():
        ms = [t * 1e3 for t in r["times"]]
        elapsed = [sum(ms[: i + 1]) / 1e3 for i in range(len(ms))]
        fast = next((i for i in range(len(ms)) if all(m <= 1.1 * compiled_ms for m in ms[i:i + 5])), None)
        last = statistics.median(ms[-20:])
        rows.append({"kernel": kernel, "steps": len(ms), "first_step_s": ms[0] / 1e3, "max_step_s": max(ms) / 1e3,
                     "compiled_speed_at_s": None if fast is None else elapsed[fast], "last20_ms": last,
                     "vs_fused": last / r["fused_ms"], "fused_ms": r["fused_ms"], "times_ms": ms})
    print(machine())
    print(table(["kernel", "steps", "first step s", "longest step s", "at compiled speed after s",
                 "last 20 steps ms", "vs torch fused AdamW"],
                [[r["kernel"], r["steps"], f"{r['first_step_s']:.2f}", f"{r['max_step_s']:.2f}",
                  "never" if r["compiled_speed_at_s"] is None else f"{r['compiled_speed_at_s']:.1f}",
                  r["last20_ms"], f"{r['vs_fused']:.2f}x"] for r in rows]))
    save("warmup_bench", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
