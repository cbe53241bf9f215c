"""Train a small GPT on the Python standard library's own source code with an adams_dist optimizer.

    python examples/train_gpt.py                          # one process (CPU, CUDA or MPS)
    torchrun --nproc_per_node=2 examples/train_gpt.py     # ZeRO: optimizer state sharded over 2 ranks
    bash launch/train_cpu.sh --steps 30                   # the same through the launcher

Tokens are bytes (vocab 256) of the stdlib's .py files, which every Python install has, so the example
needs no download. There is no DDP wrapper: the optimizer copies rank 0's parameters to every rank when
it is built, averages gradients across ranks inside step() and all-gathers the updated parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import adams_dist
from adams_dist.runtime import init_distributed, shutdown_distributed

# --------------------------------------------------------------------------------------------- model


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        # One fused Linear; its weight (3*d, d) stacks [q heads | k heads | v heads], head_dim rows per head,
        # which is exactly what set_heads(weight, 3 * n_head) describes. No biases anywhere: a key bias
        # has a structurally zero gradient, and atan2 (no epsilon) would take full steps on rounding noise.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_head, T, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d_model), SelfAttention(d_model, n_head)
        self.ln2, self.mlp = nn.LayerNorm(d_model), MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, d_model: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        # The lm head is tied to the token embedding (as in GPT-2 / nanoGPT): logits = x @ tok_emb.weight.T.
        # With 256 byte tokens an untied head would be cheap too; tying leaves one fewer embedding-like
        # matrix to keep out of spectral decay, and one parameter can only get one kind of decay anyway.
        for name, p in self.named_parameters():
            if p.ndim >= 2:  # residual projections get a smaller init, as in GPT-2
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.tok_emb.weight.T
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---------------------------------------------------------------------------------------------- data


def load_corpus(max_bytes: int, val_frac: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Bytes of the stdlib's .py files (sorted, so every machine with this Python reads the same text).

    Files are taken in path order until max_bytes; the last val_frac of those files are held out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    chunks, total = [], 0
    for rel in paths:
        if total >= max_bytes:
            break
        chunks.append((root / rel).read_bytes())
        total += len(chunks[-1])
    n_val = max(1, round(len(chunks) * val_frac))
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(chunks[:-n_val]), as_tensor(chunks[-n_val:]), len(chunks)


def get_batch(data: torch.Tensor, batch_size: int, block: int, gen: torch.Generator, device: torch.device):
    ix = torch.randint(len(data) - block - 1, (batch_size,), generator=gen).tolist()
    x = torch.stack([data[i : i + block] for i in ix]).long()
    y = torch.stack([data[i + 1 : i + block + 1] for i in ix]).long()
    return x.to(device), y.to(device)


def batch_seed(seed: int, rank: int, step: int) -> int:
    """Each (seed, rank, step) has its own batch: ranks see different data and a resumed run sees the
    batches the uninterrupted run would have seen."""
    return (seed * 100_003 + rank) * 1_000_003 + step


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy (nats/byte) of the byte frequencies: the loss of a model that ignores context."""
    p = torch.bincount(data.long(), minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# ----------------------------------------------------------------------------------------- eval, logs


@torch.no_grad()
def evaluate(model: nn.Module, batches: list) -> float:
    """Mean loss over the fixed held-out batches; each rank scores its share and the sums are reduced."""
    model.eval()
    param = next(model.parameters())
    total = torch.zeros(2, dtype=torch.float64, device=param.device)
    for x, y in batches:
        total += torch.tensor([model(x, y).item(), 1.0], dtype=torch.float64, device=param.device)
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def sigmas_to_log(optimizer, named: dict[str, nn.Parameter]) -> dict[str, list[float]]:
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


def warmup_cosine(optimizer, warmup: int, steps: int, min_lr_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_frac`` of the peak lr."""

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


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
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
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
    ap.add_argument("--data-bytes", type=int, default=3_000_000, help="corpus size cap")
    ap.add_argument("--val-frac", type=float, default=0.05, help="fraction of files held out")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16, help="fixed held-out batches, split over ranks")
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

    train_data, val_data, n_files = load_corpus(args.data_bytes, args.val_frac)
    unigram = unigram_entropy(train_data)
    eval_gen = torch.Generator().manual_seed(args.seed)  # the same held-out batches on every rank
    eval_all = [
        get_batch(val_data, args.batch_size, args.block_size, eval_gen, device) for _ in range(args.eval_batches)
    ]
    eval_batches = eval_all[rank::world]  # each rank scores its share; evaluate() sums over ranks

    torch.manual_seed(args.seed)
    model = GPT(256, args.block_size, args.n_layer, args.n_head, args.d_model).to(device)
    for block in model.blocks:
        adams_dist.set_heads(block.attn.qkv.weight, 3 * args.n_head)  # spectral decay per q/k/v head
    model.tok_emb.weight.use_spectral_decay = False  # embeddings (and the tied head) are not operators
    model.pos_emb.weight.use_spectral_decay = False

    # Matrices that get (spectral) decay, and the rest: biases, LayerNorm gains, embeddings. Adams_ZeRO
    # decays the rest by its own scalar_vector_weight_decay; the other rules get weight_decay 0 on them.
    matrices = [p for p in model.parameters() if p.ndim >= 2 and getattr(p, "use_spectral_decay", True)]
    others = [p for p in model.parameters() if id(p) not in {id(m) for m in matrices}]
    param_groups = [{"params": matrices}, {"params": others, "weight_decay": 0.0}]
    optimizer = adams_dist.create_optimizer(
        args.optimizer,
        param_groups,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip or None,
    )
    optimizer.broadcast_buffers(model.buffers())

    scheduler = warmup_cosine(optimizer, args.warmup, args.steps, args.min_lr_frac)
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

    def run_eval(step: int) -> float:
        eval_loss = evaluate(model, eval_batches)
        sigmas = sigmas_to_log(optimizer, watched) if step > 0 else {}
        log({"step": step, "eval_loss": eval_loss, "sigma": sigmas})
        if info.is_main:
            sig = " ".join(f"{k}={max(v):.2f}" for k, v in sigmas.items())
            tqdm.write(f"step {step:5d} | eval loss {eval_loss:.4f}" + (f" | max sigma {sig}" if sig else ""))
        return eval_loss

    eval_loss = run_eval(start)
    batch_gen = torch.Generator()
    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        disable=not info.is_main,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    t_run, losses, interval_time, train_time = time.perf_counter(), [], 0.0, 0.0
    for step in bar:
        t0 = time.perf_counter()
        x, y = get_batch(
            train_data,
            args.batch_size,
            args.block_size,
            batch_gen.manual_seed(batch_seed(args.seed, rank, step)),
            device,
        )
        loss = model(x, y)
        loss.backward()
        optimizer.step()  # averages gradients over ranks, updates this rank's shard, all-gathers params
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())  # waits for the step, so the timing below is honest on CUDA too
        interval_time += time.perf_counter() - t0  # eval and checkpoints are not counted in tokens/s
        done = step + 1

        if done % args.log_every == 0 or done == args.steps:
            tok_s = len(losses) * tokens_per_step / interval_time
            train_time, interval_time = train_time + interval_time, 0.0
            log(
                {
                    "step": done,
                    "train_loss": sum(losses) / len(losses),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tok_s,
                }
            )
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}", tok_s=f"{tok_s:,.0f}")  # all ranks
            losses = []
        if done % args.eval_every == 0 or done == args.steps:
            eval_loss = run_eval(done)
        maybe_save(args, done, model, optimizer, scheduler)
    bar.close()

    if info.is_main:
        wall = time.perf_counter() - t_run
        trained = args.steps - start
        summary = {
            "event": "summary",
            "final_eval_loss": eval_loss,
            "unigram_baseline": unigram,
            "wall_s": wall,
            "tokens_per_s": trained * tokens_per_step / max(train_time, 1e-9),
        }
        log(summary)
        metrics.close()
        plot_losses(metrics_path, unigram, out_dir / "loss.png")
        print(
            f"{trained} steps in {wall:.1f}s, {summary['tokens_per_s']:,.0f} tokens/s (all ranks, training only), "
            f"metrics in {metrics_path}, plot in {out_dir / 'loss.png'}"
        )
        print(f"final eval loss {eval_loss:.4f} (unigram baseline {unigram:.4f})")
    shutdown_distributed()


if __name__ == "__main__":
    main()
