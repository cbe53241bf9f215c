"""Shared helpers for the benchmarks: machine facts, interleaved timing, tables, results, a small GPT."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from adams_dist.info import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- machine and output

def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg": os.getloadavg(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1, default=str))
    return path


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, inner: int = 1,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, sampled round-robin (rotating the order every repeat)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {n: statistics.median(s) for n, s in samples.items()}


# ---------------------------------------------------------------- models

def param_mix(n_target: int, seed: int = 0, layers: int = 2) -> list[nn.Parameter]:
    """A transformer-like mix of about ``n_target`` fp32 params: per layer 4 (d,d), (4d,d), (d,4d) and 4 vectors,
    plus an (8d, d) embedding marked ``use_spectral_decay = False``. d is a multiple of 32."""
    d = max(32, round((n_target / (12 * layers + 8)) ** 0.5 / 32) * 32)
    g = torch.Generator().manual_seed(seed)
    shapes = [(8 * d, d)] + [s for _ in range(layers) for s in [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 4]
    params = [nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    params[0].use_spectral_decay = False
    return params


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A compact GPT (no biases in linears, untied head). Embedding and head get scalar decay under Adams."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, heads: int = 4, block: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        for p in (self.tok.weight, self.pos.weight, self.head.weight):
            p.use_spectral_decay = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))
