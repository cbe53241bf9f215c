"""Second-moment ablations on the example GPT: per element (Adam), per row, per column, per tensor, rotated.

    python examples/ablations.py                                         # the run recorded in docs/results.md
    python examples/ablations.py --steps 30 --lrs 3e-3 --seeds 0 --configs element row   # smoke run

For each optimizer (AdamW, AdamATan2), configuration, peak lr and seed, one run in this process. Runs with
the same seed start from the same initial weights and see the same training batches; every run is scored
on the same held-out batches. Model, data, parameter groups (decay on matrices only) and lr schedule
(linear warmup, cosine to --min-lr-frac) are those of examples/train_gpt.py (a smaller model by default);
only the optimizer's ``second_moment`` / ``rotate`` options and the lr change. Prints a Markdown table
(final eval loss, mean over seeds, per lr) and writes every number to --out (JSON).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ holds train_gpt.py
from train_gpt import (  # noqa: E402
    GPT,
    batch_seed,
    evaluate,
    get_batch,
    load_corpus,
    unigram_entropy,
    warmup_cosine,
)

import adams_dist  # noqa: E402

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
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-bytes", type=int, default=3_000_000)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="init and batch-order seeds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default="runs/ablations.json")
    return ap.parse_args()


def train(args, name: str, config: str, lr: float, seed: int, data, eval_batches) -> dict:
    torch.manual_seed(seed)
    model = GPT(256, args.block_size, args.n_layer, args.n_head, args.d_model)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices}, {"params": others, "weight_decay": 0.0}]
    optimizer = adams_dist.create_optimizer(name, groups, lr=lr, weight_decay=args.weight_decay,
                                            **CONFIGS[config])

    scheduler = warmup_cosine(optimizer, args.warmup, args.steps, args.min_lr_frac)
    gen, losses = torch.Generator(), []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = get_batch(data, args.batch_size, args.block_size, gen.manual_seed(batch_seed(seed, 0, step)),
                         torch.device("cpu"))
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    tail = losses[-20:]
    return {"optimizer": name, "config": config, "options": CONFIGS[config], "lr": lr, "seed": seed,
            "eval_loss": evaluate(model, eval_batches), "train_loss_last20": sum(tail) / len(tail),
            "state_bytes": optimizer.state_bytes(), "wall_s": wall, "train_loss": losses}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, val_data, _ = load_corpus(args.data_bytes, args.val_frac)
    eval_gen = torch.Generator().manual_seed(0)  # the same held-out batches for every run
    eval_batches = [get_batch(val_data, args.batch_size, args.block_size, eval_gen, torch.device("cpu"))
                    for _ in range(args.eval_batches)]
    torch.manual_seed(args.seeds[0])
    init_loss = evaluate(GPT(256, args.block_size, args.n_layer, args.n_head, args.d_model), eval_batches)
    results = []
    t_all = time.perf_counter()
    for name in args.optimizers:
        for config in args.configs:
            for lr in args.lrs:
                for seed in args.seeds:
                    r = train(args, name, config, lr, seed, train_data, eval_batches)
                    results.append(r)
                    print(f"{name:10s} {config:11s} lr {lr:g} seed {seed}: eval {r['eval_loss']:.4f}  "
                          f"train(last 20) {r['train_loss_last20']:.4f}  state {r['state_bytes'] / 1024:.0f} KiB  "
                          f"{r['wall_s']:.1f}s", flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "args": vars(args), "torch": torch.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "initial_eval_loss": init_loss,
            "unigram_baseline": unigram_entropy(train_data), "total_wall_s": time.perf_counter() - t_all}
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
