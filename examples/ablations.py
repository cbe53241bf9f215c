"""Second-moment ablations on the example GPT: per element (Adam), per row, per column, per tensor, rotated.

    python examples/ablations.py                                         # the run recorded in docs/results.md
    python examples/ablations.py --steps 30 --lrs 3e-3 --seeds 0 --configs element row   # smoke run

For each optimizer (AdamW, AdamATan2), configuration, peak lr and seed, one run in this process. Runs with
the same seed start from the same initial weights and see the same training batches; every run is scored
on the same held-out batches. Model, data, lr schedule (linear warmup, cosine to --min-lr-frac) and
training loop are those of examples/train_gpt.py (all in examples/gpt.py; a smaller model by default);
weight decay is on every matrix, the embeddings included. Only the optimizer's ``second_moment`` /
``rotate`` options and the lr change. Prints a Markdown table (final eval loss, mean over seeds, per lr)
and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import adams_dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ holds gpt.py
import gpt  # noqa: E402

CONFIGS = {
    "element": dict(),
    "row": dict(second_moment="row"),
    "column": dict(second_moment="column"),
    "tensor": dict(second_moment="tensor"),
    "rotate": dict(rotate=True),
    "rotate+row": dict(rotate=True, second_moment="row"),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "adamatan2"])
    ap.add_argument("--configs", nargs="+", default=["element", "row", "column", "tensor", "rotate"],
                    choices=list(CONFIGS))
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="peak learning rates")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="on matrices")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    gpt.add_gpt_flags(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="init and batch-order seeds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default="runs/ablations.json")
    return ap.parse_args()


def train_one(args, name: str, config: str, lr: float, seed: int, data, eval_batches) -> dict:
    torch.manual_seed(seed)
    model = gpt.GPT(args.block_size, args.n_layer, args.n_head, args.d_model)
    # The runs recorded in docs/results.md decay the embeddings too, unlike train_gpt.py.
    groups = gpt.param_groups(model, decay_embeddings=True)
    optimizer = adams_dist.create_optimizer(name, groups, lr=lr, weight_decay=args.weight_decay,
                                            **CONFIGS[config])
    scheduler = gpt.warmup_cosine(optimizer, args.warmup, args.steps, args.min_lr_frac)
    run = gpt.train(model, optimizer, scheduler,
                lambda step: gpt.train_batch(data, args.batch_size, args.block_size, seed, 0, step, "cpu"),
                args.steps, eval_batches)
    tail = run.losses[-20:]
    return {"optimizer": name, "config": config, "options": CONFIGS[config], "lr": lr, "seed": seed,
            "eval_loss": run.eval_loss, "train_loss_last20": sum(tail) / len(tail),
            "state_bytes": optimizer.state_bytes(), "wall_s": run.train_s, "train_loss": run.losses}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, val_data, _ = gpt.load_corpus(args.data_bytes, args.val_frac)
    # seed 0 for every run: all runs are scored on the same held-out batches
    eval_batches = gpt.held_out_batches(val_data, args.eval_batches, args.batch_size, args.block_size, 0, "cpu")
    torch.manual_seed(args.seeds[0])
    init_loss = gpt.evaluate(gpt.GPT(args.block_size, args.n_layer, args.n_head, args.d_model), eval_batches)
    results = []
    t_all = time.perf_counter()
    for name in args.optimizers:
        for config in args.configs:
            for lr in args.lrs:
                for seed in args.seeds:
                    r = train_one(args, name, config, lr, seed, train_data, eval_batches)
                    results.append(r)
                    print(f"{name:10s} {config:11s} lr {lr:g} seed {seed}: eval {r['eval_loss']:.4f}  "
                          f"train(last 20) {r['train_loss_last20']:.4f}  state {r['state_bytes'] / 1024:.0f} KiB  "
                          f"{r['wall_s']:.1f}s", flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "args": vars(args), "torch": torch.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "initial_eval_loss": init_loss,
            "unigram_baseline": gpt.unigram_entropy(train_data), "total_wall_s": time.perf_counter() - t_all}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\ninitial eval loss {init_loss:.4f}, unigram baseline {meta['unigram_baseline']:.4f}, "
          f"{meta['total_wall_s']:.0f}s in all\n")
    print(table(results, args.lrs, args.seeds))


def table(results: list[dict], lrs: list[float], seeds: list[int]) -> str:
    """Final eval loss per (optimizer, config): mean over seeds at each lr, and the best lr's."""
    lines = ["| optimizer | second moment | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + " | best | seed spread at best | state KiB (m, v, rotations) |",
             "|---|---|" + "---|" * len(lrs) + "---|---|---|"]
    keys = list(dict.fromkeys((r["optimizer"], r["config"]) for r in results))
    for name, config in keys:
        runs = [r for r in results if (r["optimizer"], r["config"]) == (name, config)]
        means, spreads = {}, {}
        for lr in lrs:
            losses = [r["eval_loss"] for r in runs if r["lr"] == lr]
            means[lr] = sum(losses) / len(losses)
            spreads[lr] = max(losses) - min(losses)
        best = min(lrs, key=lambda lr: means[lr])
        cells = [f"**{means[lr]:.3f}**" if lr == best else f"{means[lr]:.3f}" for lr in lrs]
        state = runs[0]["state_bytes"] / 1024
        lines.append(f"| {name} | {config} | " + " | ".join(cells)
                     + f" | {means[best]:.3f} (lr {best:g}) | {spreads[best]:.3f} ({len(seeds)} seeds) | {state:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
