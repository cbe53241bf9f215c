"""One compiled update kernel alone, its moments stored in fp32 or bf16: the time of one call per rule.

    python benchmarks/moment_kernel_bench.py [--numel 4194304] [--repeats 15] [--inductor-tiling]

Each kernel is ``rules.compiled.compiled_kernel`` over one flat tensor with scalar decay (the engine's own
kernels and options), called round-robin in one process on 1 thread. ``--inductor-tiling`` builds them
with inductor's own loop width instead of the full bf16 vector our builds use where a kernel has no bit
casts (rules/compiled.py), for a before/after comparison in two runs.
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved, machine, table

from adams_dist.rules import compiled
from adams_dist.rules.base import widened
from adams_dist.rules.compiled import compiled_kernel, one_graph_per_shape_kind, without_bases
from adams_dist.rules.library import adamw_rule, atan2_rule

RULES = {"Adams (atan2)": (atan2_rule, {}), "AdamW": (adamw_rule, {"eps": 1e-8})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inductor-tiling", action="store_true", help="inductor's own loop width for bf16 kernels")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.inductor_tiling:
        compiled._widen_lowp_loops_in_builds = lambda: None  # type: ignore[assignment]
    print(machine())
    n = args.numel
    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    calls = {}
    for name, (rule_fn, hyper) in RULES.items():
        update = rule_fn(lr=1e-3, step=3.0, betas=(0.9, 0.95), **hyper)
        kernel = compiled_kernel(name.split()[0], rule_fn, 1, 0)
        for dtype in (torch.float32, torch.bfloat16):
            state = (m.to(dtype), v.to(dtype))
            fn = update if dtype == torch.float32 else widened(update, torch.float32)
            call_args = without_bases((((p, (grad, *state), 0.999),), (), fn))
            with one_graph_per_shape_kind():
                kernel(*call_args)  # the build
            calls[(name, str(dtype).removeprefix("torch."))] = lambda k=kernel, a=call_args: k(*a)
    times = interleaved({f"{r} {d}": f for (r, d), f in calls.items()}, args.repeats)
    rows = [[rule, f"{1e3 * times[f'{rule} float32']:.3f}", f"{1e3 * times[f'{rule} bfloat16']:.3f}",
             f"{times[f'{rule} bfloat16'] / times[f'{rule} float32']:.2f}x"] for rule in RULES]
    width = "inductor's own" if args.inductor_tiling else "a bf16 vector"
    print(f"{n} elements; bf16 loops step by {width}")
    print(table(["kernel", "fp32 moments, ms", "bf16 moments, ms", "bf16 vs fp32"], rows))


if __name__ == "__main__":
    main()
