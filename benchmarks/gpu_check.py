"""One-GPU check: kernel parity against the float64 reference (and of the compiled 8-bit kernel against the
eager one), step time and memory vs torch fused AdamW, fp16 autocast with adams_dist.GradScaler, and an NCCL
smoke test, written to one JSON. Under 5 minutes on one GPU; ``--cpu-only`` (chosen by itself without CUDA)
runs the same checks small on the CPU, with gloo, so CI keeps the script working.

    bash scripts/gpu_check.sh [--cpu-only] [--out benchmarks/results/gpu_check.json]

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the float64 reference and the rules' hyperparameters
sys.path.insert(0, str(ROOT))

from reference64 import Reference  # noqa: E402
from rule_table import BY_NAME, TABLE  # noqa: E402

import adams_dist  # noqa: E402

RULES = [r.name for r in TABLE]
STEPS = 4
# Largest error accepted, relative to the largest weight of the tensor (as test_rules_reference's rtol):
# fp32 arithmetic over a few steps; bf16 params keep fp32 masters, so the same bound holds for them.
TOLERANCE = 1e-5


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hyperparameters(rule: str) -> dict[str, Any]:
    hp = BY_NAME[rule].hp
    return dict(hp.get("kernel", hp["dist"]))


def shapes() -> list[tuple[tuple[int, ...], int | None]]:
    """Odd shapes: a vector, a spectral matrix, a 3-head matrix, a batched 3-D matrix, one big enough to take
    the compiled kernel (>= 32768 elements)."""
    return [((37,), None), ((19, 23), None), ((24, 10), 3), ((3, 7, 11), None), ((181, 193), None)]


def gradient(rule: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random gradients; for the HomeAdam rules magnitudes 2 or 0.05 only, so every v_hat (4 or 0.0025) is far
    from tau (0.5) and no element's branch can flip between float32 and float64."""
    x = torch.randn(shape, generator=g)
    if rule.startswith("homeadam"):
        x = x.sign() * torch.where(torch.rand(shape, generator=g) < 0.5, 2.0, 0.05)
    return x


def parity(rule: str, dtype: torch.dtype, kernel: str, device: str, inject: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g).to(dtype) for s, _ in shapes()]
    params = [torch.nn.Parameter(t.to(device).clone()) for t in start]
    for p, (_, heads) in zip(params, shapes()):
        if heads:
            adams_dist.set_heads(p, heads)
    hp = hyperparameters(rule)
    opt = adams_dist.create_optimizer(rule, params, kernel=kernel, **hp)
    ref = Reference(rule, [(p.detach().cpu(), {"heads": h}) if h else p.detach().cpu()
                           for p, (_, h) in zip(params, shapes())], **hp)
    for _ in range(STEPS):
        grads = [gradient(rule, s, g) for s, _ in shapes()]
        for p, gr in zip(params, grads):
            p.grad = gr.to(device, dtype)
        opt.step()
        ref.step([gr.to(dtype).double() for gr in grads])  # the reference sees the gradients the optimizer saw
    worst = 0.0
    for p, r in zip(params, ref.params):
        got = opt.state[p]["master_param"].detach().double().cpu().view(p.shape) + inject
        worst = max(worst, float((got - r).abs().max()) / float(r.abs().max()))
    return {"rule": rule, "dtype": str(dtype).replace("torch.", ""), "kernel": opt.kernel_path,
            "max_rel_err": worst, "ok": worst <= TOLERANCE}


def param_stack(n: int, device: str) -> list[torch.nn.Parameter]:
    """About ``n`` parameters as a transformer has them: 4096-wide matrices (or smaller below 100M) and vectors."""
    d = 4096 if n >= 50_000_000 else 512
    params, total = [], 0
    while total < n:
        for shape in ((d, d), (d, int(d * 2.6875)), (d,)):
            p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
            p.grad = torch.randn(shape, device=device) * 1e-3
            params.append(p)
            total += p.numel()
    return params


def timed_steps(n: int, device: str, repeats: int) -> dict[str, Any]:
    makers = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "Adams_ZeRO auto": lambda ps: adams_dist.Adams_ZeRO(ps),
        "Adams_ZeRO compiled": lambda ps: adams_dist.Adams_ZeRO(ps, kernel="compiled"),
        "Adams_ZeRO bf16 moments": lambda ps: adams_dist.Adams_ZeRO(ps, moment_dtype=torch.bfloat16),
        # on CUDA "auto" is the compiled path: decode, update and encode in one kernel per tensor
        "Adams_ZeRO 8bit moments": lambda ps: adams_dist.Adams_ZeRO(ps, moment_dtype="8bit"),
        "AdamATan2 auto": lambda ps: adams_dist.AdamATan2(ps),
        "AdamW auto": lambda ps: adams_dist.AdamW(ps),
    }
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict[str, Any] = {"params": 0, "rows": {}}
    for name, make in makers.items():  # one optimizer's tensors at a time: 1B params fit only once
        params = param_stack(n, device)
        out["params"] = sum(p.numel() for p in params)
        opt = make(params)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        first = time.perf_counter() - t0
        opt.step()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - t0)
        state = opt.state_bytes() if hasattr(opt, "state_bytes") else None
        out["rows"][name] = {"first_step_s": first, "step_ms": 1e3 * sorted(times)[len(times) // 2],
                             "state_bytes_per_param": None if state is None else state / out["params"],
                             "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
        log(f"{out['params'] / 1e6:.0f}M params, {name}: {out['rows'][name]['step_ms']:.2f} ms/step")
        del opt, params
        if device == "cuda":
            torch.cuda.empty_cache()
    base, fp32 = out["rows"]["torch AdamW fused"]["step_ms"], out["rows"]["Adams_ZeRO auto"]["step_ms"]
    for name, row in out["rows"].items():
        row["vs_fused_adamw"] = row["step_ms"] / base
        if "moments" in name:  # the memory options must not be slower than fp32 moments on the same path
            row["vs_fp32_moments"] = row["step_ms"] / fp32
    return out


def eight_bit(device: str) -> dict[str, Any]:
    """8-bit moments, the compiled kernel (decode, update, encode in one pass) against the eager 8-bit path:
    at most one code step apart (the kernel's fused multiply-adds move a few moments across a midpoint)."""
    runs = {}
    for kernel in ("compiled", "foreach"):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in ((1024, 1031), (70001,))]
        opt = adams_dist.Adams_ZeRO(params, lr=1e-2, moment_dtype="8bit", kernel=kernel)
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        runs[kernel] = ([p.detach().cpu() for p in params],
                        [opt.state[p][k].cpu().int() for p in params for k in ("exp_avg", "exp_avg_sq")])
    (got_p, got_c), (want_p, want_c) = runs["compiled"], runs["foreach"]
    code_steps = max(int((a - b).abs().max()) for a, b in zip(got_c, want_c))
    moved = max(float((a != b).float().mean()) for a, b in zip(got_c, want_c))
    far = max(float(((a - b).abs() > 1e-5 + 1e-4 * b.abs()).float().mean()) for a, b in zip(got_p, want_p))
    return {"max_code_steps": code_steps, "codes_moved": moved, "weights_apart": far,
            "ok": code_steps <= 1 and moved < 0.01 and far < 0.01}


def amp(device: str) -> dict[str, Any]:
    """fp16 autocast with adams_dist.GradScaler; an inf at step 5 must skip that step and halve the scale."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).to(device)
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2)
    scaler = adams_dist.GradScaler(device, init_scale=2.0**10, growth_interval=1000)
    x = torch.randn(32, 64, device=device)
    losses, scales = [], []
    for step in range(20):
        with torch.autocast(device, dtype=torch.float16):
            loss = (model(x).float() - x).square().mean()
        scaler.scale(loss).backward()
        if step == 5:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(loss))
        scales.append(scaler.get_scale())
    ok = opt.skipped_steps == 1 and scales[5] == scales[4] / 2 and losses[-1] < 0.7 * losses[0]
    return {"skipped_steps": opt.skipped_steps, "scale_before_after_inf": scales[4:6], "first_loss": losses[0],
            "last_loss": losses[-1], "ok": ok}


def smoke(backend: str, device: str) -> dict[str, Any]:
    """A process group of one (nccl on CUDA, gloo on CPU): ZeRO mode must equal the one-process optimizer."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        results = []
        for group in (None, dist.group.WORLD):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5)).to(device)
            opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2, process_group=group)
            for step in range(3):
                x = torch.randn(8, 33, generator=torch.Generator().manual_seed(step)).to(device)
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            results.append([p.detach().cpu() for p in model.parameters()])
        err = max(float((a - b).abs().max()) for a, b in zip(*results))
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "max_abs_diff": err, "ok": err <= 1e-6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-only", action="store_true", help="small checks on the CPU (default without CUDA)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--inject-error", type=float, default=0.0, help="add this to every result (tests the checker)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu_only
    device = "cuda" if gpu else "cpu"
    if not gpu:
        torch.set_num_threads(1)
    report: dict[str, Any] = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu",
                              "cuda": torch.version.cuda, "mode": "gpu" if gpu else "cpu-only"}
    # Parity: every rule, fp32 and bf16 params; on CPU the compiled kernel is left out (a minute per rule).
    kernels = ["foreach", "compiled"] if gpu else ["foreach"]
    report["parity"] = []
    for rule in RULES:
        for dtype in (torch.float32, torch.bfloat16):
            for kernel in kernels:
                row = parity(rule, dtype, kernel, device, args.inject_error)
                report["parity"].append(row)
                log(f"parity {rule} {row['dtype']} {row['kernel']}: {row['max_rel_err']:.2e} "
                    f"{'ok' if row['ok'] else 'FAILED'}")
    if not gpu:
        report["parity_compiled"] = "skipped: cpu (torch.compile takes about a minute per rule here)"
    sizes = [100_000_000, 1_000_000_000] if gpu else [2_000_000]
    report["timing"] = []
    for n in sizes:
        if gpu and n * 4 * 6 > torch.cuda.mem_get_info()[0]:  # params, grads, 3 fp32 states and headroom
            report["timing"].append({"params": n, "skipped": "not enough free GPU memory"})
            continue
        report["timing"].append(timed_steps(n, device, repeats=10 if gpu else 3))
    if gpu:
        report["eight_bit"] = eight_bit(device)
        row = report["eight_bit"]
        log(f"8-bit moments, compiled vs eager: {'ok' if row['ok'] else 'FAILED'} {row}")
    else:
        report["eight_bit"] = "skipped: cpu (tests/unit/test_quant8_compiled.py checks it there)"
    report["amp"] = amp(device)
    log(f"fp16 autocast + GradScaler: {'ok' if report['amp']['ok'] else 'FAILED'} {report['amp']}")
    report["smoke"] = smoke("nccl" if gpu else "gloo", device)
    log(f"process group of one ({report['smoke']['backend']}): diff {report['smoke']['max_abs_diff']:.1e}")
    report["ok"] = (all(r["ok"] for r in report["parity"]) and report["amp"]["ok"] and report["smoke"]["ok"]
                    and (not gpu or report["eight_bit"]["ok"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=lambda v: None if v != v else v))
    log(f"{'ok' if report['ok'] else 'FAILED'}; results in {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
