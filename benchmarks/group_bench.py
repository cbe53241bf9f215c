"""Tensors per compiled call (``rules.compiled.GROUP_PIECES``): step time and cold build time of each setting.

    python benchmarks/group_bench.py [--rule adamw] [--size 2e6] [--pieces 1 4 16] [--repeats 21]

One optimizer per setting on its own copy of the ``common.param_mix`` set-up (``kernel="compiled"``,
gradients preset), plus torch's fused AdamW, all sampled round-robin in one process (1 thread). The setting
is read at each call, so each optimizer steps under its own. "first step s" is each setting's build; the
first setting also pays the compiler's start-up, and a graph an earlier setting built (the same piece
counts) is reused. Run with a fresh ``TORCHINDUCTOR_CACHE_DIR`` for cold builds.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import interleaved, machine, param_mix, save, table

import adams_dist
from adams_dist.rules import compiled

RULES = {"adams": adams_dist.Adams_ZeRO, "atan2": adams_dist.AdamATan2, "adamw": adams_dist.AdamW,
         "srf": adams_dist.AdamSRF, "homeadamew": adams_dist.HomeAdamEW}


def with_grads(n: int) -> list[torch.nn.Parameter]:
    params = param_mix(n)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rule", choices=sorted(RULES), default="adamw")
    ap.add_argument("--size", type=float, default=2e6)
    ap.add_argument("--pieces", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = int(args.size)
    fused = torch.optim.AdamW(with_grads(n), fused=True)
    steps, first = {"torch AdamW fused": fused.step}, {}
    for k in args.pieces:
        opt = RULES[args.rule](with_grads(n), kernel="compiled")

        def step(opt=opt, k=k) -> None:
            compiled.GROUP_PIECES = k
            opt.step()

        t0 = time.perf_counter()
        step()
        first[f"{k} a call"] = time.perf_counter() - t0
        steps[f"{k} a call"] = step
    inner = 5 if n < 5e6 else 1
    med = interleaved(steps, args.repeats, inner=inner, warmup=3)
    rows = [[name, n, med[name] * 1e3, med[name] / med["torch AdamW fused"], first.get(name, "")] for name in steps]
    print(machine())
    print(table(["setting", "params", "ms/step", "vs torch fused", "first step s"], rows))
    save(f"group_bench_{args.rule}_{args.size / 1e6:g}M", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
