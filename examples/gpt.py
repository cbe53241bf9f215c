"""The example GPT that train_gpt.py, compare.py and ablations.py share: the model, the byte-level corpus,
the parameter groups, the lr schedule and one training loop with its evaluation.

Tokens are bytes (vocab 256) of the Python standard library's own .py files, which every Python install
has, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import adams_dist

VOCAB = 256  # bytes

# --------------------------------------------------------------------------------------------- model


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        # One fused Linear; its weight (3*d, d) stacks [q heads | k heads | v heads], head_dim rows per head,
        # which is exactly what set_heads(weight, 3 * n_head) describes. No biases anywhere: a key bias
        # has a structurally zero gradient, and atan2 (no epsilon) would take full steps on rounding noise.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        adams_dist.set_heads(self.qkv.weight, 3 * n_head)  # spectral decay per q/k/v head
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
    def __init__(self, block_size: int, n_layer: int, n_head: int, d_model: int):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        # The lm head is tied to the token embedding (as in GPT-2 / nanoGPT): logits = x @ tok_emb.weight.T.
        # With 256 byte tokens an untied head would be cheap too; tying leaves one fewer embedding-like
        # matrix to keep out of spectral decay, and one parameter can only get one kind of decay anyway.
        self.tok_emb.weight.use_spectral_decay = False  # embeddings (and the tied head) are not operators
        self.pos_emb.weight.use_spectral_decay = False
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


def param_groups(model: GPT, decay_embeddings: bool = False) -> list[dict]:
    """The matrices, which get weight decay (spectral for Adams), and the rest: LayerNorm gains and, unless
    decay_embeddings, the embeddings. Adams_ZeRO decays the rest by its own scalar_vector_weight_decay;
    the other rules get weight_decay 0 on them."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    matrices = [p for p in model.parameters() if p.ndim >= 2 and (decay_embeddings or id(p) not in embeddings)]
    others = [p for p in model.parameters() if id(p) not in {id(m) for m in matrices}]
    return [{"params": matrices}, {"params": others, "weight_decay": 0.0}]


def add_gpt_flags(ap: argparse.ArgumentParser, n_layer: int = 2, d_model: int = 64, block_size: int = 64) -> None:
    """The flags of every example script for the model's size, the batches and the corpus."""
    ap.add_argument("--n-layer", type=int, default=n_layer)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=d_model)
    ap.add_argument("--block-size", type=int, default=block_size)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (per rank under torchrun)")
    ap.add_argument("--data-bytes", type=int, default=3_000_000, help="corpus size cap")
    ap.add_argument("--val-frac", type=float, default=0.05, help="fraction of files held out")
    ap.add_argument("--eval-batches", type=int, default=16, help="fixed held-out batches (split over ranks)")


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


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy (nats/byte) of the byte frequencies: the loss of a model that ignores context."""
    p = torch.bincount(data.long(), minlength=VOCAB).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def get_batch(data: torch.Tensor, batch_size: int, block: int, gen: torch.Generator, device: torch.device):
    ix = torch.randint(len(data) - block - 1, (batch_size,), generator=gen).tolist()
    x = torch.stack([data[i : i + block] for i in ix]).long()
    y = torch.stack([data[i + 1 : i + block + 1] for i in ix]).long()
    return x.to(device), y.to(device)


def batch_seed(seed: int, rank: int, step: int) -> int:
    """Each (seed, rank, step) has its own batch: ranks see different data and a resumed run sees the
    batches the uninterrupted run would have seen."""
    return (seed * 100_003 + rank) * 1_000_003 + step


def train_batch(data: torch.Tensor, batch_size: int, block: int, seed: int, rank: int, step: int, device):
    """The training batch of (seed, rank, step)."""
    return get_batch(data, batch_size, block, torch.Generator().manual_seed(batch_seed(seed, rank, step)), device)


def held_out_batches(data: torch.Tensor, n: int, batch_size: int, block: int, seed: int, device) -> list:
    """n fixed batches of the held-out files: the same on every rank and in every run with this seed."""
    gen = torch.Generator().manual_seed(seed)
    return [get_batch(data, batch_size, block, gen, device) for _ in range(n)]


# ------------------------------------------------------------------------------------ schedule, eval


def warmup_cosine(optimizer, warmup: int, steps: int, min_lr_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_frac`` of the peak lr."""

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


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


# ---------------------------------------------------------------------------------------------- train


@dataclass
class Run:
    losses: list[float]  # train loss of every step run, the one a stop rule refused included
    eval_loss: float  # after the last step
    stopped: str | None  # why the stop rule ended the run early; None when it ran to the end
    train_s: float  # seconds in training steps (evaluation and hooks not counted)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    eval_batches: list,
    *,
    start: int = 0,
    eval_every: int = 0,
    log_every: int = 0,
    clip_grad_norm: float = 0.0,
    progress: bool = False,
    stop: Callable[[int, float], str | None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Run:
    """Train from step ``start`` to ``steps`` on the batches ``batch_at(step)``, stepping the lr schedule.

    Evaluates on ``eval_batches`` at the start and every ``eval_every`` steps when eval_every > 0, and
    always after the last step. Hooks, all optional and called on every rank:
    - ``stop(step, loss)``: a reason to end the run now, before the optimizer steps on that loss;
    - ``on_log(record)``: every ``log_every`` steps, the mean train loss, lr and tokens/s since the last;
    - ``on_eval(step, eval_loss)``: after each evaluation (``step`` = steps done);
    - ``on_step(step)``: after each step, e.g. to save a checkpoint.
    ``clip_grad_norm`` is for optimizers that do not clip themselves (adams_dist's take max_grad_norm).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    run = Run(losses=[], eval_loss=math.nan, stopped=None, train_s=0.0)
    evaluated_at = None

    def run_eval(done: int) -> None:
        nonlocal evaluated_at
        run.eval_loss, evaluated_at = evaluate(model, eval_batches), done
        if on_eval:
            on_eval(done, run.eval_loss)

    if eval_every:
        run_eval(start)
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    done, interval_losses, interval_s = start, [], 0.0
    for step in bar:
        t0 = time.perf_counter()
        x, y = batch_at(step)
        loss = model(x, y)
        run.losses.append(loss.item())  # read before the step, so a diverging run stops before stepping on it
        if stop and (reason := stop(step, run.losses[-1])):
            run.stopped = reason
            break
        loss.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()  # adams_dist under torchrun: averages gradients, updates this rank's shard, all-gathers
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        seconds = time.perf_counter() - t0
        run.train_s, interval_s = run.train_s + seconds, interval_s + seconds
        interval_losses.append(run.losses[-1])
        done = step + 1

        if log_every and (done % log_every == 0 or done == steps):
            mean = sum(interval_losses) / len(interval_losses)
            tok_s = len(interval_losses) * x.numel() * world / interval_s
            bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tok_s:,.0f}")
            if on_log:
                on_log({"step": done, "train_loss": mean, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s})
            interval_losses, interval_s = [], 0.0
        if eval_every and (done % eval_every == 0 or done == steps):
            run_eval(done)
        if on_step:
            on_step(done)
    bar.close()
    if evaluated_at != done:
        run_eval(done)
    return run
