"""Spectral-decay work per rank vs world size: adams_dist row shards vs the adams-torch reference.

    python benchmarks/spectral_bench.py [--d 512] [--layers 4] [--worlds 1 2 4] [--repeats 15] [--threads 1]

For each world size W, rank 0's rows of every GPT matrix (qkv, proj, fc, out; the engine's own row
layout from adams_dist.layout.make_slot) go through what one rank computes in a step:
``spectral.partial_wtu`` (W_r^T u_r), ``normalize_heads`` and ``decay_rows`` (W_r -= c (W_r v) v^T).
Rank 0 owns the most rows, so its time is the per-rank time. The reference's spectral block
(adams-torch 0.0.1 ``_adams_zero_distributed``, copied below) runs on the full matrix on every rank and
adds its rank's chunk of the full M x N rank-1 matrix to its master shard. The one all-reduce of the
partials (heads*cols fp32 per matrix, independent of W) is not timed here; dist_bench times whole steps.
"""

from __future__ import annotations

import argparse

import matplotlib
import torch
import torch.nn.functional as F
from common import GPT, interleaved, machine, save, table

from adams_dist import spectral
from adams_dist.layout import make_slot

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COEF = 1e-4  # lr * wd * sqrt(M) stand-in; small so repeated decays keep the weights sane


def matrices(d: int, layers: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(vocab=256, d=d, layers=layers, heads=max(1, d // 64))
    return [p.detach() for p in model.parameters() if spectral.SpectralShape.of(p) is not None]


def adams_dist_rank(mats: list[torch.Tensor], world: int, rank: int = 0):
    """A closure doing rank ``rank``'s spectral work for all matrices, on its own copies of its rows."""
    work = []
    for p in mats:
        slot = make_slot(p, 0, 0, world, rank)
        shape = slot.spectral
        rows = p.reshape(-1, shape.cols)[slot.row_start: slot.row_start + slot.local_rows].clone()
        work.append((rows, torch.ones(slot.local_rows), slot.row_start, shape, torch.zeros(shape.heads)))

    def step():
        for rows, u, start, shape, sigma_sq in work:
            partial = torch.zeros(shape.heads, shape.cols)
            spectral.partial_wtu(rows, u, start, shape, partial)
            v, dead = spectral.normalize_heads(partial)  # after the all-reduce, in a real run
            spectral.decay_rows(rows, u, start, shape, v, dead, COEF, sigma_sq)
    return step


def reference_rank(mats: list[torch.Tensor], world: int, rank: int = 0):
    """adams-torch 0.0.1's spectral block, verbatim but for names: full matrix work on every rank."""
    work = [(p.clone(), torch.ones(p.shape[:-1]), p.reshape(-1).chunk(world)[rank].clone()) for p in mats]

    def step():
        for param, u, master_param in work:
            v = F.normalize(torch.einsum("...nm,...n->...m", param, u), dim=-1)
            Wv = torch.einsum("...nm,...m->...n", param, v)  # noqa: N806
            F.normalize(Wv, dim=-1, out=u)
            s = torch.einsum("...n,...n->...", u, Wv)
            best_rank1_approx = torch.einsum("...n, ...m->...nm", s.unsqueeze(-1) * u, v)
            master_param.add_(best_rank1_approx.view(-1).chunk(world)[rank], alpha=-COEF)
    return step


def plot(rows: list[dict], path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in ("adams_dist", "adams-torch"):
        pts = [(r["world"], r["ms"]) for r in rows if r["impl"] == impl]
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("world size W")
    ax.set_ylabel("spectral-decay ms per rank per step")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"{rows[0]['matrix_params'] / 1e6:.1f}M matrix params, CPU, {torch.get_num_threads()} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a rank in dist runs has 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mats = matrices(args.d, args.layers)
    n = sum(p.numel() for p in mats)
    fns = {}
    for w in args.worlds:
        fns[("adams_dist", w)] = adams_dist_rank(mats, w)
        fns[("adams-torch", w)] = reference_rank(mats, w)
    times = interleaved(fns, args.repeats, warmup=2)
    w1 = {impl: times[(impl, min(args.worlds))] for impl in ("adams_dist", "adams-torch")}
    rows = [dict(impl=impl, world=w, ms=t * 1e3, matrix_params=n, speedup_vs_w1=w1[impl] / t,
                 reference_over_adams_dist=times[("adams-torch", w)] / times[("adams_dist", w)])
            for (impl, w), t in sorted(times.items(), key=lambda kv: (kv[0][0] != "adams_dist", kv[0][1]))]
    allreduce_kb = sum(spectral.SpectralShape.of(p).heads * p.shape[-1] for p in mats) * 4 / 1024
    print(machine())
    print(f"{len(mats)} matrices, {n / 1e6:.2f}M params; the partials' all-reduce carries {allreduce_kb:.0f} KiB "
          "at every W")
    print(table(["impl", "W", "ms per rank", f"speedup vs W={min(args.worlds)}", "adams-torch / adams_dist"],
                [[r["impl"], r["world"], r["ms"], f"{r['speedup_vs_w1']:.2f}x",
                  f"{r['reference_over_adams_dist']:.2f}x"] for r in rows]))
    plot(rows, save("spectral_bench", {"args": vars(args), "rows": rows}).with_suffix(".png"))


if __name__ == "__main__":
    main()
