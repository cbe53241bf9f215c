"""Isolated optimizer.step() on one process: every adams_dist rule against torch and the reference packages.

    python benchmarks/step_bench.py [--sizes 2e6 2e7] [--repeats 15] [--threads N] [--quick] [--profile]

Gradients are set once; each sample times ``inner`` consecutive steps. "first step s" is each optimizer's
first ``step()``, compile included; run with a fresh ``TORCHINDUCTOR_CACHE_DIR`` for a cold compile.
All competitors (and a copy_ bandwidth probe over the same working set, 4 fp32 buffers of n) are sampled
round-robin in one run.
Bytes model: an ideal single-pass Adam-family step reads p, g, m, v and writes p, m, v: 28 B/param
in fp32, for every optimizer here (spectral decay's extra matrix reads are not counted).
"""

from __future__ import annotations

import argparse
import time
import warnings

import adam_atan2_pytorch
import adams
import matplotlib
import torch
from common import interleaved, machine, param_mix, save, table

import adams_dist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BYTES_PER_PARAM = 28
BASELINES = ("torch AdamW fused", "adams-torch Adams_ZeRO")  # every run times these: the ratios divide by them

COMPETITORS = {
    "adams_dist Adams_ZeRO": adams_dist.Adams_ZeRO,
    "adams_dist AdamATan2": adams_dist.AdamATan2,
    "adams_dist AdamW": adams_dist.AdamW,
    "adams_dist AdamSRF": adams_dist.AdamSRF,
    "adams_dist HomeAdam": adams_dist.HomeAdam,
    "adams_dist HomeAdamEW": adams_dist.HomeAdamEW,
    # the fused torch.compile kernels (opt-in on CPU; warmed up before timing, so compile time is excluded)
    "adams_dist Adams_ZeRO compiled": lambda ps: adams_dist.Adams_ZeRO(ps, kernel="compiled"),
    "adams_dist AdamATan2 compiled": lambda ps: adams_dist.AdamATan2(ps, kernel="compiled"),
    "adams_dist AdamW compiled": lambda ps: adams_dist.AdamW(ps, kernel="compiled"),
    "adams_dist AdamSRF compiled": lambda ps: adams_dist.AdamSRF(ps, kernel="compiled"),
    "adams_dist HomeAdamEW compiled": lambda ps: adams_dist.HomeAdamEW(ps, kernel="compiled"),
    # state stored in bfloat16 (moment_dtype): fewer bytes per step, each step computes in fp32
    "adams_dist Adams_ZeRO bf16 moments": lambda ps: adams_dist.Adams_ZeRO(ps, moment_dtype=torch.bfloat16),
    "adams_dist Adams_ZeRO compiled bf16 moments": lambda ps: adams_dist.Adams_ZeRO(ps, kernel="compiled",
                                                                                    moment_dtype=torch.bfloat16),
    "adams_dist AdamW compiled bf16 moments": lambda ps: adams_dist.AdamW(ps, kernel="compiled",
                                                                          moment_dtype=torch.bfloat16),
    # 8-bit blockwise moments: a quarter of the fp32 moments' bytes, dequantized and requantized each step
    "adams_dist Adams_ZeRO 8bit moments": lambda ps: adams_dist.Adams_ZeRO(ps, moment_dtype="8bit"),
    # compiled: decode, update and encode in one kernel per tensor, no float copy of the moments
    "adams_dist Adams_ZeRO compiled 8bit moments": lambda ps: adams_dist.Adams_ZeRO(ps, kernel="compiled",
                                                                                    moment_dtype="8bit"),
    "adams_dist AdamW compiled 8bit moments": lambda ps: adams_dist.AdamW(ps, kernel="compiled", moment_dtype="8bit"),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "adams-torch Adams_ZeRO": lambda ps: adams.Adams_ZeRO(ps),
    "adam-atan2-pytorch AdamAtan2": lambda ps: adam_atan2_pytorch.AdamAtan2(ps, lr=1e-3, weight_decay=0.01),
}


def build(make, n: int):
    params = param_mix(n)
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adams-torch warns that world_size is 1
        opt = make(params)
    return opt, sum(p.numel() for p in params)


def copy_probe(n: int):
    src, dst = torch.randn(4 * n), torch.empty(4 * n)
    return lambda: dst.copy_(src), 2 * 4 * 4 * n


def bench(n_target: int, repeats: int, names: list[str]) -> list[dict]:
    opts, first, n = {}, {}, 0
    for name in dict.fromkeys([*names, *BASELINES]):
        make = COMPETITORS[name]
        opts[name], n = build(make, n_target)
        start = time.perf_counter()  # the first step, compile included (kernels another optimizer built are reused)
        opts[name].step()
        first[name] = time.perf_counter() - start
    probe, probe_bytes = copy_probe(n)
    fns = {name: opt.step for name, opt in opts.items()} | {"copy_ probe": probe}
    inner = max(1, round(6e6 / n))
    times = interleaved(fns, repeats, inner=inner, warmup=2)
    copy_gbs = probe_bytes / times.pop("copy_ probe") / 1e9
    base, ref = times["torch AdamW fused"], times["adams-torch Adams_ZeRO"]
    rows = []
    for name, t in times.items():
        gbs = BYTES_PER_PARAM * n / t / 1e9
        rows.append(dict(size=n, optimizer=name, ms=t * 1e3, ns_per_param=t / n * 1e9, gbs=gbs,
                         frac_copy=gbs / copy_gbs, vs_fused=t / base, vs_reference=t / ref, copy_gbs=copy_gbs,
                         first_step_s=first[name]))
    return rows


def profile_adams(n_target: int) -> str:
    opt, _ = build(adams_dist.Adams_ZeRO, n_target)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            opt.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40)


def plot(rows: list[dict], path) -> None:
    sizes = sorted({r["size"] for r in rows})
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(sizes)
    for i, size in enumerate(sizes):
        vals = [next(r["ns_per_param"] for r in rows if r["size"] == size and r["optimizer"] == nm) for nm in names]
        ax.barh([j + i * width for j in range(len(names))], vals, height=width, label=f"{size / 1e6:.1f}M params")
    ax.set_yticks([j + width * (len(sizes) - 1) / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel("ns / param / step (lower is better)")
    ax.set_title(f"optimizer.step(), CPU, {torch.get_num_threads()} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[2e6, 2e7])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats (smoke test)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler top ops of Adams_ZeRO.step()")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--only", nargs="+", default=list(COMPETITORS), choices=list(COMPETITORS), metavar="NAME",
                    help="time these (plus the baselines) instead of every competitor")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.repeats = [2e5], 3
    rows = [r for size in args.sizes for r in bench(int(size), args.repeats, args.only)]
    print(machine())
    print(f"bytes model: {BYTES_PER_PARAM} B/param; copy_ probe GB/s: "
          + ", ".join(f"{r['size'] / 1e6:.1f}M: {r['copy_gbs']:.1f}" for r in rows if "Adams_ZeRO" in r["optimizer"]
                      and r["optimizer"].startswith("adams_dist")))
    print(table(["params", "optimizer", "ms/step", "ns/param", "GB/s", "of copy", "vs torch fused", "vs adams-torch",
                 "first step s"],
                [[f"{r['size'] / 1e6:.1f}M", r["optimizer"], r["ms"], r["ns_per_param"], r["gbs"],
                  f"{r['frac_copy']:.0%}", f"{r['vs_fused']:.2f}x", f"{r['vs_reference']:.2f}x",
                  f"{r['first_step_s']:.2f}"] for r in rows]))
    plot(rows, save("step_bench", {"args": vars(args), "rows": rows}).with_suffix(".png"))
    if args.profile:
        print(profile_adams(int(max(args.sizes))))


if __name__ == "__main__":
    main()
