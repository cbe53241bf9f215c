"""8-bit moments on one parameter larger than the engine's dequantization batch: cut into pieces or whole.

    python benchmarks/big_param_8bit.py [--n 4096] [--steps 3]

Each configuration runs in a fresh process, one thread: one n x n fp32 matrix, Adams_ZeRO with
``moment_dtype="8bit"``, a warm-up step, then ``--steps`` timed steps. "whole" sets the batch above the
parameter's size, as the engine did before it cut large parameters into pieces of whole blocks.
Peak RSS is the process's high-water mark (it includes torch itself, the parameter and its gradient).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import machine, save, table

WHOLE = 1 << 40


def measure(n: int, steps: int, batch: int) -> dict[str, float]:
    import torch

    import adams_dist
    from adams_dist import storage

    storage.QUANT_BATCH = batch
    torch.set_num_threads(1)
    p = torch.nn.Parameter(torch.randn(n, n))
    opt = adams_dist.Adams_ZeRO([p], lr=1e-3, moment_dtype="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return {"ms_per_step": (time.perf_counter() - start) / steps * 1e3,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.n, args.steps, args.child)))
        return
    from adams_dist.storage import QUANT_BATCH

    rows, results = [], {}
    for label, batch in (("pieces", QUANT_BATCH), ("whole", WHOLE)):
        out = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--steps", str(args.steps),
                              "--child", str(batch)], capture_output=True, text=True, check=True).stdout
        results[label] = json.loads(out.strip().splitlines()[-1])
        rows.append([label, f"{results[label]['ms_per_step']:.0f}", f"{results[label]['peak_rss_mib']:.0f}"])
    print(machine())
    print(table(["moments widened", "ms/step", "peak RSS MiB"], rows))
    save("big_param_8bit", {"machine": machine(), "n": args.n, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
