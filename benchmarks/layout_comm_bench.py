"""Communication of one optimizer step on DTensor layouts (FSDP2, HSDP, TP, FSDP+TP) at W=4, CPU/gloo.

    python benchmarks/layout_comm_bench.py [--steps 2] [--d 128] [--layers 2] [--vocab 256]

A small transformer (separate q/k/v/o and an MLP, d=128, 4 heads, untied embedding and head) is laid out
four ways over 4 gloo processes: FSDP2 (``fully_shard`` on a 1-D mesh of 4, Shard(0)); HSDP (a (2, 2)
("replicate", "shard") mesh, (Replicate(), Shard(0))); TP (``parallelize_module`` on a 1-D mesh of 4,
ColwiseParallel on q/k/v/up, RowwiseParallel on o/down, every other module replicated by
``distribute_module``); FSDP+TP (a (2, 2) ("dp", "tp") mesh: TP on mesh["tp"], then ``fully_shard`` on
mesh["dp"]). Each layout trains adams_dist Adams_ZeRO and torch AdamW(foreach) on its DTensor parameters,
without and with gradient clipping at 1.0 (adams_dist ``max_grad_norm=1.0``; torch
``clip_grad_norm_`` before ``step()``, counted with it).

Counted: only ``optimizer.step()`` (plus torch's ``clip_grad_norm_``), never forward or backward, as the
mean over ``--steps`` steps after one warm-up step. Every collective reaching the dispatcher in that window is
counted by a ``CommDebugMode`` subclass (c10d ops such as ``dist.all_reduce`` and DTensor's functional
collectives), which also sums ring-model bytes sent per rank: all-reduce 2(W-1)/W, reduce-scatter /
all-gather / broadcast / all-to-all (W-1)/W of the full tensor's bytes, W = the size of the op's group.
adams_dist's own counters (``collectives_issued``, ``bytes_sent``: the same ring model over the optimizer's
group) are read over the same window and reported beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from common import machine, save, table
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import adams_dist
from adams_dist.testing import run

LAYOUTS = ["FSDP2", "HSDP", "TP", "FSDP+TP"]
OPTIMIZERS = ["adams_dist Adams_ZeRO", "torch AdamW(foreach)"]


# ---------------------------------------------------------------- counting

def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def _group_size(args) -> int:
    for a in args:
        if isinstance(a, torch.ScriptObject):  # a c10d op's ProcessGroup, boxed
            return dist.ProcessGroup.unbox(a).size()
    for a in reversed(args):  # functional collectives name their group last
        if isinstance(a, str):
            try:
                return dist.distributed_c10d._resolve_process_group(a).size()
            except (RuntimeError, ValueError, KeyError):
                pass
    raise RuntimeError(f"no process group among {args}")


class CommBytes(CommDebugMode):
    """CommDebugMode that also sums ring-model bytes sent by this rank. The full tensor of a collective is the
    largest of its tensor arguments or its output (an all-gather's output, a reduce-scatter's input)."""

    def __enter__(self):
        self.bytes = 0.0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.get_total_counts()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is not NotImplemented and self.get_total_counts() > before:
            world = _group_size(args)
            full = max(sum(t.numel() * t.element_size() for t in _tensors(x)) for x in (*args, out))
            factor = 2 if "reduce" in func.__name__ and "scatter" not in func.__name__ else 1
            self.bytes += factor * full * (world - 1) / world
        return out


# ---------------------------------------------------------------- model and layouts

class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.head_dim = d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)  # under TP each rank holds some of the heads: -1 is the local head count
        q, k, v = (f(h).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Model(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, block: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def _tensor_parallel(model: Model, mesh) -> None:
    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel(),
            "up": ColwiseParallel(), "down": RowwiseParallel()}
    for blk in model.blocks:
        parallelize_module(blk, mesh, plan)
    # every other module: Replicate() parameters, plain tensors in and out
    to_dtensor = lambda mod, inputs, m: tuple(DTensor.from_local(x, m, [Replicate()], run_check=False)  # noqa: E731
                                              for x in inputs)
    to_local = lambda mod, out, m: out.to_local()  # noqa: E731
    for mod in (model.tok, model.pos, model.ln, model.head, *(m for b in model.blocks for m in (b.ln1, b.ln2))):
        distribute_module(mod, mesh, input_fn=to_dtensor, output_fn=to_local)


def build(layout: str, cfg: dict) -> tuple[Model, int]:
    """The model laid out as ``layout``, and this rank's data-parallel index (ranks of one TP group share data)."""
    torch.manual_seed(0)
    model = Model(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["block"])
    rank = dist.get_rank()
    if layout == "FSDP2":
        fully_shard(model, mesh=init_device_mesh("cpu", (4,)))
        dp = rank
    elif layout == "HSDP":
        fully_shard(model, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
        dp = rank
    elif layout == "TP":
        _tensor_parallel(model, init_device_mesh("cpu", (4,)))
        dp = 0
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        _tensor_parallel(model, mesh["tp"])
        fully_shard(model, mesh=mesh["dp"])
        dp = mesh["dp"].get_local_rank()
    for p in (model.tok.weight, model.pos.weight, model.head.weight):  # set after wrapping: it makes new params
        p.use_spectral_decay = False
    return model, dp


def spectral_payload(opt) -> tuple[int, int]:
    """Floats per step of adams_dist's spectral reductions: the W^T u partials (heads x cols per matrix, in the
    control all-reduce) and W v (u-sized, a second all-reduce) for matrices whose columns ranks split."""
    slots = [s for s in opt._slots if s.spectral is not None]
    return (sum(s.spectral.heads * s.spectral.cols for s in slots),
            sum(s.spectral.u_numel for s in slots if s.cols_split))


def measure(layout: str, name: str, clip: bool, cfg: dict) -> dict:
    model, dp = build(layout, cfg)
    params = list(model.parameters())
    if name.startswith("adams_dist"):
        opt = adams_dist.Adams_ZeRO(params, lr=1e-3, max_grad_norm=1.0 if clip else None)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    gen = torch.Generator().manual_seed(100 + dp)
    n = n_bytes = own_n = own_bytes = 0.0
    for s in range(1 + cfg["steps"]):
        x = torch.randint(cfg["vocab"], (cfg["batch"], cfg["block"] + 1), generator=gen)
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        own = (opt.collectives_issued, opt.bytes_sent) if isinstance(opt, adams_dist.ShardedOptimizer) else (0, 0)
        with CommBytes() as mode:
            if clip and not name.startswith("adams_dist"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= 1:
            n, n_bytes = n + mode.get_total_counts(), n_bytes + mode.bytes
            if isinstance(opt, adams_dist.ShardedOptimizer):
                own_n += opt.collectives_issued - own[0]
                own_bytes += opt.bytes_sent - own[1]
        ops = {str(k): v for k, v in mode.get_comm_counts().items()}
    k = cfg["steps"]
    local = sum(p.to_local().numel() * p.element_size() for p in params)
    row = dict(layout=layout, optimizer=name, clip=clip, collectives=n / k, bytes=n_bytes / k, ops=ops,
               n_params=sum(p.numel() for p in params), local_param_bytes=local,  # fp32: 4 B per param
               placements=sorted({str(tuple(p.placements)) for p in params}))
    if isinstance(opt, adams_dist.ShardedOptimizer):
        wtu, wv = spectral_payload(opt)
        row.update(own_collectives=own_n / k, own_bytes=own_bytes / k, wtu_floats=wtu, wv_floats=wv)
    return row


def worker(rank: int, world: int, cfg: dict) -> list[dict]:
    warnings.simplefilter("ignore")
    rows = []
    for layout in LAYOUTS:
        for name in OPTIMIZERS:
            for clip in (False, True):
                t0 = time.perf_counter()
                try:
                    row = measure(layout, name, clip, cfg)
                except Exception as e:  # reported, not fatal: the other layouts still run
                    row = dict(layout=layout, optimizer=name, clip=clip, error=f"{type(e).__name__}: {e}")
                    dist.barrier()
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    cfg = vars(ap.parse_args())
    t0 = time.perf_counter()
    per_rank = run(worker, 4, cfg, timeout=1200)
    elapsed = time.perf_counter() - t0
    rows = per_rank[0]
    ok = [r for r in rows if "error" not in r]
    for r, *others in zip(*per_rank):  # bytes differ by rank only through what each rank holds
        r["max_bytes_any_rank"] = max(o.get("bytes", 0) for o in (r, *others))
    print(machine())
    print(f"W=4, {ok[0]['n_params'] / 1e6:.3f}M params, fp32; {elapsed:.0f} s")
    print(table(["layout", "optimizer", "clip", "collectives/step", "bytes sent/rank/step", "adams_dist's own count",
                 "local params", "spectral floats (W^T u + W v)", "spectral / local param bytes"],
                [[r["layout"], r["optimizer"], "1.0" if r["clip"] else "-", f"{r['collectives']:.0f}",
                  f"{r['bytes']:.0f}",
                  f"{r['own_collectives']:.0f} / {r['own_bytes']:.0f} B" if "own_bytes" in r else "-",
                  r["local_param_bytes"] // 4,
                  f"{r['wtu_floats']} + {r['wv_floats']}" if "wtu_floats" in r else "-",
                  f"{4 * (r['wtu_floats'] + r['wv_floats']) / r['local_param_bytes']:.2%}" if "wtu_floats" in r
                  else "-"] for r in ok]))
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['layout']} / {r['optimizer']} / clip={r['clip']}: {r['error']}")
    save("layout_comm_bench", {"args": cfg, "seconds": elapsed, "rows": per_rank[0], "per_rank": per_rank})


if __name__ == "__main__":
    main()
