"""The example GPT's whole train step (forward, backward, step, zero_grad) eager vs under one torch.compile.

    python benchmarks/compile_bench.py [--steps 30] [--repeats 9] [--threads N] [--quick]

Two identical copies of the model and Adams_ZeRO (default kernel; examples/gpt.py sizes: 2 layers, d_model 64, block 64,
batch 16), sampled round-robin in one run. Reports the first compiled call (the compile), the median
step after it, the ratio, and how many graphs Dynamo built: a recompile would show as a growing count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from common import interleaved, machine, save, table
from torch._dynamo.utils import counters

import adams_dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt  # noqa: E402


def make(batch: int):
    torch.manual_seed(0)
    model = gpt.GPT(block_size=64, n_layer=2, n_head=4, d_model=64)
    opt = adams_dist.Adams_ZeRO(gpt.param_groups(model), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, gpt.VOCAB, (2, batch, 64), generator=g)

    def train_step() -> torch.Tensor:
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    return train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=20, help="train steps per timed sample")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="3 repeats of 3 steps (smoke test)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.steps = 3, 3
    eager, compiled = make(args.batch), torch.compile(make(args.batch))
    t0 = time.perf_counter()
    compiled()
    first = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    times = interleaved({"eager": eager, "compiled": compiled}, args.repeats, inner=args.steps)
    row = {"eager_ms": times["eager"] * 1e3, "compiled_ms": times["compiled"] * 1e3,
           "ratio": times["compiled"] / times["eager"], "first_call_s": first, "graphs_after_first": graphs,
           "graphs_after_all": counters["stats"]["unique_graphs"], "steps_run": 1 + (args.repeats + 1) * args.steps}
    print(machine())
    print(table(["eager ms/step", "compiled ms/step", "compiled / eager", "first compiled call s",
                 "graphs after 1 step", "after all steps", "steps"],
                [[row["eager_ms"], row["compiled_ms"], f"{row['ratio']:.2f}x", row["first_call_s"],
                  row["graphs_after_first"], row["graphs_after_all"], row["steps_run"]]]))
    save("compile_bench", {"args": vars(args), "row": row})


if __name__ == "__main__":
    main()
