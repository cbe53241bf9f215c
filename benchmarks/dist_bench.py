"""Distributed training step of a small GPT on CPU/gloo at several world sizes, four ways of sharding Adam.

    python benchmarks/dist_bench.py [--worlds 1 2 4] [--steps 8] [--d 128] [--layers 2] [--vocab 1024] [--batch 8]

Competitors (all in the same spawned processes, one thread each, steps interleaved round-robin):
adams_dist Adams_ZeRO (plain model; overlap off and on), adams-torch Adams_ZeRO (plain model),
DDP + torch AdamW(foreach), DDP + ZeroRedundancyOptimizer(AdamW), and adams_dist Adams_ZeRO on a DDP-wrapped
model, with DDP's all-reduce left on and turned off by adams_dist.ddp_without_allreduce. Each step is barrier,
forward, backward, step; a phase's time is the max over ranks, then the median over steps. Collectives and
bytes: adams_dist counts its own (plus, on a DDP model, DDP's in forward and backward); the others are
counted by wrapping torch.distributed functions
(DDP runs with its default allreduce_hook registered as a python comm hook, so its all-reduces go through them).
Bytes sent per rank use the ring model: all-reduce 2(W-1)/W, reduce-scatter / all-gather / broadcast (W-1)/W
of the full tensor's bytes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import adams
import matplotlib
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import GPT, machine, save, table
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import adams_dist
from adams_dist.testing import run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DDP_ADAMS = "DDP + adams_dist Adams_ZeRO"  # DDP all-reduces, then the optimizer averages again
DDP_ADAMS_OFF = "DDP, no all-reduce + adams_dist Adams_ZeRO"  # adams_dist.ddp_without_allreduce
NAMES = ["adams_dist Adams_ZeRO", "adams_dist Adams_ZeRO overlap", "adams-torch Adams_ZeRO", "DDP + torch AdamW",
         "DDP + ZeRO(AdamW)", DDP_ADAMS, DDP_ADAMS_OFF]
COUNT = {"current": None, "n": {}, "bytes": {}}  # collectives issued through wrapped calls, per competitor


def _count(n_bytes: float) -> None:
    name = COUNT["current"]
    COUNT["n"][name] = COUNT["n"].get(name, 0) + 1
    COUNT["bytes"][name] = COUNT["bytes"].get(name, 0) + n_bytes


def _wrap_collectives(world: int) -> None:
    """Count python-level collectives (adams-torch, ZeroRedundancyOptimizer) with ring-model bytes."""
    f = (world - 1) / world
    factors = {"all_reduce": 2 * f, "broadcast": f, "reduce_scatter_tensor": f, "all_gather_into_tensor": f}
    for name, factor in factors.items():
        orig = getattr(dist, name)

        @functools.wraps(orig)
        def wrapped(*a, _orig=orig, _factor=factor, **k):
            if COUNT["current"] is not None:  # the full tensor is the largest one passed (in for RS, out for AG)
                full = max((t for t in (*a, *k.values()) if isinstance(t, torch.Tensor)), key=torch.Tensor.numel)
                _count(_factor * full.numel() * full.element_size())
            return _orig(*a, **k)
        setattr(dist, name, wrapped)


def _state_bytes(opt, params) -> int:
    if isinstance(opt, adams_dist.ShardedOptimizer):
        return opt.state_bytes()
    inner = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
    aliases = {p.untyped_storage().data_ptr() for p in params}
    seen, total = set(), 0
    for st in inner.state.values():
        for key, t in st.items():
            if not isinstance(t, torch.Tensor) or key == "step" or t.untyped_storage().data_ptr() in aliases:
                continue
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def build(name: str, world: int, cfg: dict):
    torch.manual_seed(0)
    model = GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["block"])
    params = list(model.parameters())
    if name in (DDP_ADAMS, DDP_ADAMS_OFF):
        model = DDP(model)
        if name == DDP_ADAMS:
            model.register_comm_hook(None, allreduce_hook)  # counted, as for the DDP rows
        else:
            adams_dist.ddp_without_allreduce(model)
        opt = adams_dist.Adams_ZeRO(params, lr=1e-3)
    elif name.startswith("adams_dist"):
        opt = adams_dist.Adams_ZeRO(params, lr=1e-3, overlap=name.endswith("overlap"))
    elif name.startswith("adams-torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = adams.Adams_ZeRO(params, lr=1e-3)
    else:
        model = DDP(model)
        model.register_comm_hook(None, allreduce_hook)  # DDP's default, but via dist.all_reduce: counted
        if "ZeRO" in name:
            opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3, foreach=True)
        else:
            opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    return model, opt, params


def worker(rank: int, world: int, cfg: dict) -> dict:
    warnings.simplefilter("ignore", FutureWarning)  # reduce_scatter_tensor / all_gather_into_tensor renamed
    warnings.filterwarnings("ignore", "Adams_ZeRO's parameters belong to a DistributedDataParallel")  # DDP_ADAMS
    _wrap_collectives(world)
    runs = {name: build(name, world, cfg) for name in NAMES}
    gen = torch.Generator().manual_seed(100 + rank)
    times = {n: {"fwd+bwd": [], "step": [], "total": []} for n in NAMES}
    base = {}
    for s in range(cfg["warmup"] + cfg["steps"]):
        if s == cfg["warmup"]:
            COUNT["n"].clear(), COUNT["bytes"].clear()
            base = {n: (o.collectives_issued, o.bytes_sent) for n, (_, o, _) in runs.items()
                    if isinstance(o, adams_dist.ShardedOptimizer)}
        x = torch.randint(cfg["vocab"], (cfg["batch"], cfg["block"] + 1), generator=gen)
        for name in NAMES[s % len(NAMES):] + NAMES[: s % len(NAMES)]:
            model, opt, _ = runs[name]
            COUNT["current"] = name if s >= cfg["warmup"] else None
            dist.barrier()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            if cfg["sync_before_step"]:  # the step phase then excludes waiting for the slowest rank's backward
                dist.barrier()
            t1 = time.perf_counter()
            if isinstance(opt, adams_dist.ShardedOptimizer):  # its step counts itself; wrapped calls before = DDP's
                COUNT["current"] = None
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            COUNT["current"] = None
            if s >= cfg["warmup"]:
                for key, val in (("fwd+bwd", t1 - t0), ("step", t2 - t1), ("total", t2 - t0)):
                    times[name][key].append(val)
    out = {}
    for name, (_, opt, params) in runs.items():
        if name in base:  # adams_dist's own counters, plus DDP's in forward and backward
            n = opt.collectives_issued - base[name][0] + COUNT["n"].get(name, 0)
            b = opt.bytes_sent - base[name][1] + COUNT["bytes"].get(name, 0)
        else:
            n, b = COUNT["n"].get(name, 0), COUNT["bytes"].get(name, 0)
        out[name] = dict(times=times[name], collectives=n / cfg["steps"], bytes=b / cfg["steps"],
                         state_bytes=_state_bytes(opt, params), n_params=sum(p.numel() for p in params))
    return out


def summarize(per_rank: list[dict], world: int) -> list[dict]:
    rows = []
    for name in NAMES:
        t = [r[name]["times"] for r in per_rank]
        med = {k: statistics.median(max(vals) for vals in zip(*(tr[k] for tr in t))) for k in t[0]}
        r0 = per_rank[0][name]
        rows.append(dict(world=world, optimizer=name, step_ms=med["step"] * 1e3, fwd_bwd_ms=med["fwd+bwd"] * 1e3,
                         total_ms=med["total"] * 1e3, collectives=r0["collectives"], mb_sent=r0["bytes"] / 2**20,
                         state_mb=max(r[name]["state_bytes"] for r in per_rank) / 2**20, n_params=r0["n_params"]))
    ref = {r["world"]: r for r in rows if r["optimizer"] == "DDP + torch AdamW"}
    for r in rows:
        r["total_vs_ddp"] = r["total_ms"] / ref[r["world"]]["total_ms"]
    return rows


def plot(rows: list[dict], path) -> None:
    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(NAMES)
    for ax, key, label in ((axes[0], "step_ms", "optimizer.step() ms"), (axes[1], "total_ms", "fwd+bwd+step ms")):
        for i, name in enumerate(NAMES):
            vals = [next(r[key] for r in rows if r["world"] == w and r["optimizer"] == name) for w in worlds]
            ax.bar([j + i * width for j in range(len(worlds))], vals, width=width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], [f"W={w}" for w in worlds])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"GPT {rows[0]['n_params'] / 1e6:.2f}M params, CPU gloo, 1 thread per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank")
    ap.add_argument("--sync-before-step", action="store_true",
                    help="barrier between backward and step, so 'step ms' is update + collectives only")
    args = ap.parse_args()
    cfg = vars(args)
    rows = [r for w in args.worlds for r in summarize(run(worker, w, cfg, timeout=900), w)]
    print(machine())
    print(f"GPT: {rows[0]['n_params'] / 1e6:.2f}M params, fp32; batch {args.batch}x{args.block} tokens per rank")
    print(table(["W", "optimizer", "step ms", "fwd+bwd ms", "total ms", "total vs DDP+AdamW", "collectives/step",
                 "MiB sent/rank/step", "state MiB/rank"],
                [[r["world"], r["optimizer"], r["step_ms"], r["fwd_bwd_ms"], r["total_ms"], f"{r['total_vs_ddp']:.2f}x",
                  f"{r['collectives']:.0f}", f"{r['mb_sent']:.2f}", f"{r['state_mb']:.2f}"] for r in rows]))
    plot(rows, save("dist_bench", {"args": cfg, "rows": rows}).with_suffix(".png"))


if __name__ == "__main__":
    main()
