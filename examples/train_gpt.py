"""Train a small GPT on the Python standard library's own source code with an adams_dist optimizer.

    python examples/train_gpt.py                          # one process (CPU, CUDA or MPS)
    torchrun --nproc_per_node=2 examples/train_gpt.py     # ZeRO: optimizer state sharded over 2 ranks
    bash launch/train_cpu.sh --steps 30                   # the same through the launcher

Tokens are bytes (vocab 256) of the stdlib's .py files, which every Python install has, so the example
needs no download. There is no DDP wrapper: the optimizer copies rank 0's parameters to every rank when
it is built, averages gradients across ranks inside step() and all-gathers the updated parameters.
The model, the corpus and the training loop are in examples/gpt.py; this script adds the command line,
metrics, checkpoints and the loss plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import adams_dist
from adams_dist.runtime import init_distributed, shutdown_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ holds gpt.py

import gpt  # noqa: E402

# ------------------------------------------------------------------------------------------ logs


def sigmas_to_log(optimizer, named: dict[str, torch.nn.Parameter]) -> dict[str, list[float]]:
    """Latest spectral-norm estimate (one per head) of a few matrices. Collective: call on every rank."""
    if not hasattr(optimizer, "spectral_sigmas"):
        return {}
    sigmas = optimizer.spectral_sigmas()
    return {name: sigmas[p].float().cpu().tolist() for name, p in named.items() if p in sigmas}


def plot_losses(metrics_path: Path, unigram: float, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    # One point per step; a resumed run's records replace those the interrupted run wrote after its checkpoint.
    train = sorted({r["step"]: r["train_loss"] for r in rows if "train_loss" in r}.items())
    evals = sorted({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}.items())
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in train], [v for _, v in train], label="train (rank 0)")
    ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval (held-out files)")
    ax.axhline(unigram, ls="--", c="gray", label=f"unigram baseline {unigram:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("GPT on Python stdlib bytes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- checkpoint hooks
# adams_dist.save_checkpoint(path, model, optimizer, **extra) and load_checkpoint(path, model, optimizer)
# -> extra (docs/checkpoints.md) are collective: every rank calls them. A checkpoint loads at any world size.
# With an adams_dist that predates them, these two functions do nothing.


def maybe_save(args, step: int, model, optimizer, scheduler) -> None:
    if not args.ckpt_every or not hasattr(adams_dist, "save_checkpoint"):
        return
    if step % args.ckpt_every == 0 or step == args.steps:
        path = Path(args.out_dir) / "ckpt.pt"
        adams_dist.save_checkpoint(path, model, optimizer, step=step, scheduler=scheduler.state_dict())


def maybe_resume(args, model, optimizer, scheduler) -> int:
    """The step to start from: 0, or the step of <out-dir>/ckpt.pt when --resume finds one."""
    path = Path(args.out_dir) / "ckpt.pt"
    if not args.resume or not hasattr(adams_dist, "load_checkpoint") or not path.exists():
        return 0
    extra = adams_dist.load_checkpoint(path, model, optimizer)
    scheduler.load_state_dict(extra["scheduler"])
    return int(extra["step"])


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpt.add_gpt_flags(ap, n_layer=4, d_model=128, block_size=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--optimizer",
        default="adams",
        help="adams, adamatan2, adamw, adamsrf, homeadam(ew); the SRF rules step by m/v, not m/sqrt(v): "
        "give them a much smaller --lr (1e-5)",
    )
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine")
    ap.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of --lr")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="on matrices (spectral for adams)")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="max global grad norm (0: off)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/gpt")
    ap.add_argument("--ckpt-every", type=int, default=0, help="save every N steps (0: never)")
    ap.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt if present")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    info = init_distributed(backend="gloo" if args.device == "cpu" else None)
    rank, world = info.rank, info.world_size
    device = info.device if args.device in ("auto", info.device.type) else torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out_dir = Path(args.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    train_data, val_data, n_files = gpt.load_corpus(args.data_bytes, args.val_frac)
    unigram = gpt.unigram_entropy(train_data)
    eval_all = gpt.held_out_batches(val_data, args.eval_batches, args.batch_size, args.block_size, args.seed, device)
    eval_batches = eval_all[rank::world]  # each rank scores its share; evaluate() sums over ranks

    torch.manual_seed(args.seed)
    model = gpt.GPT(args.block_size, args.n_layer, args.n_head, args.d_model).to(device)
    optimizer = adams_dist.create_optimizer(
        args.optimizer,
        gpt.param_groups(model),
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip or None,
    )
    optimizer.broadcast_buffers(model.buffers())

    scheduler = gpt.warmup_cosine(optimizer, args.warmup, args.steps, args.min_lr_frac)
    if (args.ckpt_every or args.resume) and not hasattr(adams_dist, "save_checkpoint") and info.is_main:
        print("note: this adams_dist has no save_checkpoint/load_checkpoint; --ckpt-every/--resume do nothing")
    start = maybe_resume(args, model, optimizer, scheduler)
    if start and info.is_main:
        print(f"resumed from {Path(args.out_dir) / 'ckpt.pt'} at step {start}")

    watched = {
        "blocks.0.attn.qkv": model.blocks[0].attn.qkv.weight,
        "blocks.0.mlp.fc": model.blocks[0].mlp.fc.weight,
        f"blocks.{args.n_layer - 1}.mlp.proj": model.blocks[-1].mlp.proj.weight,
    }
    metrics_path = out_dir / "metrics.jsonl"
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * args.block_size * world
    if info.is_main:
        mode = "a" if start else "w"
        metrics = metrics_path.open(mode, buffering=1)
        config = {
            **vars(args),
            "world_size": world,
            "device": str(device),
            "n_params": n_params,
            "n_files": n_files,
            "train_bytes": len(train_data),
            "val_bytes": len(val_data),
            "unigram_baseline": unigram,
        }
        metrics.write(json.dumps({"event": "config", **config}) + "\n")
        print(
            f"{n_params / 1e6:.2f}M params | {world} rank(s) on {device} | {args.optimizer} | "
            f"{len(train_data) / 1e6:.2f} MB train, {len(val_data) / 1e6:.2f} MB held out "
            f"({n_files} files) | unigram baseline {unigram:.3f} nats/byte"
        )

    def log(record: dict) -> None:
        if info.is_main:
            metrics.write(json.dumps(record) + "\n")

    def log_eval(step: int, eval_loss: float) -> None:
        sigmas = sigmas_to_log(optimizer, watched) if step > 0 else {}
        log({"step": step, "eval_loss": eval_loss, "sigma": sigmas})
        if info.is_main:
            sig = " ".join(f"{k}={max(v):.2f}" for k, v in sigmas.items())
            tqdm.write(f"step {step:5d} | eval loss {eval_loss:.4f}" + (f" | max sigma {sig}" if sig else ""))

    t_run = time.perf_counter()
    run = gpt.train(
        model,
        optimizer,
        scheduler,
        lambda step: gpt.train_batch(train_data, args.batch_size, args.block_size, args.seed, rank, step, device),
        args.steps,
        eval_batches,
        start=start,
        eval_every=args.eval_every,
        log_every=args.log_every,
        progress=info.is_main,
        on_log=log,
        on_eval=log_eval,
        on_step=lambda step: maybe_save(args, step, model, optimizer, scheduler),
    )

    if info.is_main:
        wall = time.perf_counter() - t_run
        trained = args.steps - start
        summary = {
            "event": "summary",
            "final_eval_loss": run.eval_loss,
            "unigram_baseline": unigram,
            "wall_s": wall,
            "tokens_per_s": trained * tokens_per_step / max(run.train_s, 1e-9),
        }
        log(summary)
        metrics.close()
        plot_losses(metrics_path, unigram, out_dir / "loss.png")
        print(
            f"{trained} steps in {wall:.1f}s, {summary['tokens_per_s']:,.0f} tokens/s (all ranks, training only), "
            f"metrics in {metrics_path}, plot in {out_dir / 'loss.png'}"
        )
        print(f"final eval loss {run.eval_loss:.4f} (unigram baseline {unigram:.4f})")
    shutdown_distributed()


if __name__ == "__main__":
    main()
