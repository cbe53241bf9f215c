"""Peak extra memory of one optimizer step: adams_dist vs the adams-torch reference (and torch AdamW for scale).

    python benchmarks/memory_bench.py [--size 2e7] [--configs 1:fp32 2:fp32 2:bf16] [--optimizers NAME ...]

Every (optimizer, W, dtype) runs in fresh processes (gloo when W > 1) on the step_bench parameter mix
with preset gradients. After one warm-up step (state exists), rank 0 measures step 2 with
torch.profiler(profile_memory=True): the peak of the running sum of its allocation/free events
above the start of the step, the sum of all allocations in it, and the largest single allocation with
the outermost aten op around it;
and step 3 by RSS: VmHWM reset through /proc/self/clear_refs, peak minus RSS before the step (glibc
is told to mmap every block >= 64 KiB, so freed temporaries leave RSS at once).
Numbers are MiB on rank 0; "x params" divides by the bytes of all parameters in their dtype. "state B/param"
is the optimizer state rank 0 holds (``state_bytes()``; masters that alias fp32 parameters not counted),
divided by the number of all parameters: 12/W would be an fp32 master plus fp32 m and v.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import adams
import matplotlib
import torch
from common import machine, param_mix, save, table
from torch.profiler import ProfilerActivity, profile

import adams_dist
from adams_dist.testing import run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OPTIMIZERS = {
    "adams_dist Adams_ZeRO": lambda ps: adams_dist.Adams_ZeRO(ps),
    "adams_dist Adams_ZeRO bf16 moments": lambda ps: adams_dist.Adams_ZeRO(ps, moment_dtype=torch.bfloat16),
    # bf16 parameters only: no master copy, updates rounded stochastically into the parameters
    "adams_dist Adams_ZeRO bf16 moments, no master": lambda ps: adams_dist.Adams_ZeRO(
        ps, master_dtype=None, moment_dtype=torch.bfloat16),
    # bf16 parameters only: the fp32 master kept exactly as the parameter plus an int16 remainder
    "adams_dist Adams_ZeRO bf16 moments, remainder": lambda ps: adams_dist.Adams_ZeRO(
        ps, master_remainder=True, moment_dtype=torch.bfloat16),
    # m and v as 8-bit codes with a float32 scale per 256 elements (adams_dist/quant8.py)
    "adams_dist Adams_ZeRO 8bit moments": lambda ps: adams_dist.Adams_ZeRO(ps, moment_dtype="8bit"),
    "adams_dist Adams_ZeRO compiled 8bit moments": lambda ps: adams_dist.Adams_ZeRO(ps, moment_dtype="8bit",
                                                                                    kernel="compiled"),
    "adams_dist Adams_ZeRO 8bit moments, remainder": lambda ps: adams_dist.Adams_ZeRO(
        ps, master_remainder=True, moment_dtype="8bit"),
    "adams_dist Adams_ZeRO 8bit moments, no master": lambda ps: adams_dist.Adams_ZeRO(
        ps, master_dtype=None, moment_dtype="8bit"),
    "adams-torch Adams_ZeRO": lambda ps: adams.Adams_ZeRO(ps),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
}
MIB = 2**20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _profiled_peak(opt) -> tuple[int, int, int, str]:
    """Bytes: (peak allocated above the start of one step, all allocated in it, the largest allocation), its op."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = total = 0
    for _, n in mem:
        live += n
        peak = max(peak, live)
        total += max(n, 0)
    t, biggest = max(mem, key=lambda m: m[1], default=(0, 0))
    ops = [(e.duration_ns(), e.name()) for e in events
           if e.name().startswith("aten::") and e.start_ns() <= t <= e.start_ns() + e.duration_ns()]
    return peak, total, biggest, max(ops, default=(0, "-"))[1]  # the outermost aten op around the allocation


def worker(rank: int, world: int, name: str, size: int, dtype: str) -> dict:
    warnings.simplefilter("ignore")
    params = param_mix(size)
    for p in params:
        p.data = p.data.to(getattr(torch, dtype))
    g = torch.Generator().manual_seed(rank)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype)
    opt = OPTIMIZERS[name](params)
    opt.step()
    peak, total, biggest, op = _profiled_peak(opt)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    opt.step()
    rss = _status("VmHWM") - before
    return dict(optimizer=name, world=world, dtype=dtype, n_params=sum(p.numel() for p in params),
                param_bytes=sum(p.numel() * p.element_size() for p in params), peak=peak, total=total,
                biggest=biggest, biggest_op=op, rss_peak=rss,
                state_bytes=opt.state_bytes() if hasattr(opt, "state_bytes") else None)


def _per_param(row: dict) -> str:
    return "-" if row["state_bytes"] is None else f"{row['state_bytes'] / row['n_params']:.2f}"


def plot(rows: list[dict], path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"W={r['world']} {r['dtype']}\n{r['optimizer']}" for r in rows]
    ax.barh(range(len(rows)), [r["peak"] / MIB for r in rows], label="profiler: peak allocated in step")
    ax.barh(range(len(rows)), [r["rss_peak"] / MIB for r in rows], height=0.3, label="RSS high-water - RSS before")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MiB extra during one step (rank 0)")
    ax.legend(fontsize=8)
    ax.set_title(f"{rows[0]['n_params'] / 1e6:.1f}M params")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=2e7)
    ap.add_argument("--configs", nargs="+", default=["1:fp32", "2:fp32", "2:bf16"],
                    help="W:dtype; torch AdamW runs only at W=1 (it is not sharded)")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS), metavar="NAME")
    args = ap.parse_args()
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    for config in args.configs:
        world, dtype = config.split(":")
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
        for name in args.optimizers:
            if name.startswith("torch") and (int(world) > 1 or dtype != "float32"):
                continue
            if name.endswith(("no master", "remainder")) and dtype != "bfloat16":
                continue
            rows.append(run(worker, int(world), name, int(args.size), dtype, process_group=int(world) > 1,
                            env=env, timeout=900)[0])
    print(machine())
    print(f"{rows[0]['n_params'] / 1e6:.1f}M params (step_bench mix)")
    print(table(["W", "dtype", "optimizer", "state B/param", "peak MiB (profiler)", "x params", "RSS peak MiB",
                 "allocated MiB in step", "largest alloc MiB", "by op"],
                [[r["world"], r["dtype"], r["optimizer"], _per_param(r), r["peak"] / MIB,
                  f"{r['peak'] / r['param_bytes']:.2f}", r["rss_peak"] / MIB, r["total"] / MIB, r["biggest"] / MIB,
                  r["biggest_op"]] for r in rows]))
    plot(rows, save("memory_bench", {"args": vars(args), "rows": rows}).with_suffix(".png"))


if __name__ == "__main__":
    main()
