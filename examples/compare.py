"""Compare optimizers on the example GPT: same model, data and seed; a learning-rate sweep per optimizer.

    python examples/compare.py                       # default sweep: 48 runs, 8-10 minutes on 2 CPU cores
    python examples/compare.py --quick               # smoke run of the same sweep, well under a minute
    python examples/compare.py --optimizers adams adamw --lrs 1e-4 3e-4 1e-3 3e-3 1e-2 --steps 400
    python examples/compare.py --replot --out runs/compare   # redo table and plots from results.json

Every (optimizer, lr) run happens in this one process (no torchrun) and starts from the same initial
weights and sees the same sequence of training batches; the held-out batches are the same for all. The
model, data, parameter groups, lr schedule (linear warmup, then cosine to --min-lr-frac) and training loop
are those of examples/train_gpt.py (all in examples/gpt.py). Each adams_dist optimizer keeps its own
published defaults (betas (0.9, 0.95) for adams, (0.9, 0.999) for the others); only lr and weight_decay
are set, as in train_gpt.py (--betas sets one pair for all of them).

Learning rates. The Adam-type rules (adams, adamw, adamatan2) take --lrs. The SRF-type rules (adamsrf,
homeadam, homeadamew) step by m/v instead of m/sqrt(v), so an element's step is lr * m/v ~ lr / |g|:
thousands of times larger than Adam's for the small gradients of this model. Their useful learning rates
are several orders of magnitude smaller, so they take --lrs-srf. SGD (torch.optim.SGD, momentum 0.9, the
only optimizer here that is not adams_dist) steps by lr * g, much smaller than Adam's per-element steps,
and takes --lrs-sgd. --lrs-for NAME=LR,LR,... overrides the list of one optimizer.

Outputs in --out: results.json (every run: per-step train loss, final eval loss, divergence, spikes;
non-finite numbers are written as null), table.md, lr_sweep.png and curves.png.

Definitions (also written into results.json and table.md):
- diverged: a non-finite train loss; or a train loss above --abort-factor x the initial (step-0) train
  loss, at which point the run is stopped; or a final eval loss that is non-finite or above the initial
  eval loss (the loss of the untrained model, ~ln 256).
- spike: a step t >= W (W = --spike-window, 20) whose train loss exceeds (1 + R) x the median of the
  train losses of the W previous steps (R = --spike-rel, 0.25). Consecutive flagged steps are one spike;
  counting stops at the first non-finite loss.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import adams_dist
from adams_dist.info import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ holds gpt.py

import gpt  # noqa: E402

ADAM_TYPE = ("adams", "adamw", "adamatan2")
SRF_TYPE = ("adamsrf", "homeadam", "homeadamew")
ALL_OPTIMIZERS = (*ADAM_TYPE, *SRF_TYPE, "sgd")
DEFAULT_OPTIMIZERS = ("adams", "adamw", "adamatan2", "adamsrf", "homeadamew", "sgd")
LABELS = {
    "adams": "Adams",
    "adamw": "AdamW",
    "adamatan2": "AdamATan2",
    "adamsrf": "AdamSRF",
    "homeadam": "HomeAdam",
    "homeadamew": "HomeAdamEW",
    "sgd": "SGD (momentum 0.9)",
}

# --quick changes these defaults (flags given explicitly still win).
QUICK = dict(
    steps=60,
    n_layer=1,
    d_model=32,
    n_head=2,
    block_size=32,
    batch_size=8,
    warmup=5,
    eval_batches=2,
    data_bytes=300_000,
    out="runs/compare_quick",
)


# ---------------------------------------------------------------------------------------- definitions


def spike_steps(losses: list[float], window: int = 20, rel: float = 0.25) -> list[int]:
    """Steps where a loss spike starts.

    Step t (t >= window) is flagged when losses[t] > (1 + rel) * median(losses[t - window : t]); a run of
    consecutive flagged steps is one spike, reported at its first step. Counting stops at the first
    non-finite loss (that is divergence, not a spike).
    """
    onsets: list[int] = []
    previous_flagged = False
    for t in range(len(losses)):
        if not math.isfinite(losses[t]):
            break
        if t < window:
            continue
        flagged = losses[t] > (1.0 + rel) * statistics.median(losses[t - window : t])
        if flagged and not previous_flagged:
            onsets.append(t)
        previous_flagged = flagged
    return onsets


def count_spikes(losses: list[float], window: int = 20, rel: float = 0.25) -> int:
    return len(spike_steps(losses, window, rel))


def lr_list(name: str, args: argparse.Namespace) -> list[float]:
    overrides = dict(args.lrs_for or [])
    if name in overrides:
        return overrides[name]
    if name in SRF_TYPE:
        return list(args.lrs_srf)
    if name == "sgd":
        return list(args.lrs_sgd)
    return list(args.lrs)


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------- runs


class Setup:
    """Everything the runs share: data, batches, initial weights, initial losses."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        train_data, val_data, self.n_files = gpt.load_corpus(args.data_bytes, args.val_frac)
        self.unigram = gpt.unigram_entropy(train_data)
        self.eval_batches = gpt.held_out_batches(
            val_data, args.eval_batches, args.batch_size, args.block_size, args.seed, self.device
        )
        self.batches = [  # one fixed batch sequence, reused by every run
            gpt.train_batch(train_data, args.batch_size, args.block_size, args.seed, 0, step, self.device)
            for step in range(args.steps)
        ]
        self.train_bytes, self.val_bytes = len(train_data), len(val_data)
        torch.manual_seed(args.seed)
        model = self.new_model(init=False)
        self.init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.n_params = sum(p.numel() for p in model.parameters())
        self.initial_eval = gpt.evaluate(model, self.eval_batches)
        with torch.no_grad():
            self.initial_train = float(model(*self.batches[0]))

    def new_model(self, init: bool = True) -> gpt.GPT:
        a = self.args
        model = gpt.GPT(a.block_size, a.n_layer, a.n_head, a.d_model).to(self.device, getattr(torch, a.param_dtype))
        if init:
            model.load_state_dict(self.init_state)
        return model


def build_optimizer(name: str, model: gpt.GPT, lr: float, args: argparse.Namespace) -> torch.optim.Optimizer:
    """train_gpt.py's parameter groups: decay on matrices, none on embeddings, norms (Adams: scalar decay)."""
    groups = gpt.param_groups(model)
    if name == "sgd":
        # torch's SGD weight decay is coupled L2 (g += wd * p), amplified 10x by momentum 0.9: not comparable
        # to the decoupled decay of the others, hence its own flag (default 0).
        groups[0]["weight_decay"] = args.sgd_weight_decay
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    extra = {"betas": tuple(args.betas)} if args.betas else {}
    if args.moment_dtype != "float32":
        extra["moment_dtype"] = args.moment_dtype if args.moment_dtype == "8bit" else getattr(torch, args.moment_dtype)
    if args.no_master:
        extra["master_dtype"] = None
    return adams_dist.create_optimizer(
        name, groups, lr=lr, weight_decay=args.weight_decay, max_grad_norm=args.grad_clip or None, **extra
    )


def train_one(setup: Setup, name: str, lr: float, bar: tqdm | None = None) -> dict[str, Any]:
    args = setup.args
    model = setup.new_model()
    optimizer = build_optimizer(name, model, lr, args)

    def diverged(step: int, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite train loss at step {step}"
        if loss > args.abort_factor * setup.initial_train:
            return f"train loss {loss:.3g} > {args.abort_factor:g} x initial at step {step}; stopped"
        return None

    def show(record: dict) -> None:
        if bar is not None:
            status = f"{name} lr={lr:g} step {record['step']} loss {record['train_loss']:.3f}"
            bar.set_postfix_str(status, refresh=False)

    run = gpt.train(
        model,
        optimizer,
        gpt.warmup_cosine(optimizer, args.warmup, args.steps, args.min_lr_frac),
        lambda step: setup.batches[step],
        args.steps,
        setup.eval_batches,
        log_every=25,  # how often the bar shows the loss
        clip_grad_norm=args.grad_clip if name == "sgd" else 0.0,  # the adams_dist rules clip in step()
        stop=diverged,
        on_log=show,
    )
    reason = run.stopped
    if reason is None and not math.isfinite(run.eval_loss):
        reason = "non-finite final eval loss"
    elif reason is None and run.eval_loss > setup.initial_eval:
        reason = f"final eval loss {run.eval_loss:.3f} above the initial {setup.initial_eval:.3f}"
    onsets = spike_steps(run.losses, args.spike_window, args.spike_rel)
    return {
        "optimizer": name,
        "lr": lr,
        "final_eval_loss": finite_or_none(run.eval_loss),
        "diverged": reason is not None,
        "diverged_reason": reason,
        "spikes": len(onsets),
        "spike_steps": onsets,
        "steps_done": len(run.losses) if run.stopped is None else len(run.losses) - 1,
        "train_s": run.train_s,
        "train_losses": [finite_or_none(v) for v in run.losses],
    }


# ------------------------------------------------------------------------------------- table and plots


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Per optimizer, the non-diverged run with the lowest final eval loss."""
    best: dict[str, dict] = {}
    for r in runs:
        if r["diverged"] or r["final_eval_loss"] is None:
            continue
        if r["optimizer"] not in best or r["final_eval_loss"] < best[r["optimizer"]]["final_eval_loss"]:
            best[r["optimizer"]] = r
    return best


def optimizer_order(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["optimizer"] for r in runs))


def stable_range(runs: list[dict], name: str) -> str:
    ok = sorted(r["lr"] for r in runs if r["optimizer"] == name and not r["diverged"])
    tried = sorted(r["lr"] for r in runs if r["optimizer"] == name)
    if not ok:
        return "none"
    span = f"{ok[0]:g} .. {ok[-1]:g}" if len(ok) > 1 else f"{ok[0]:g}"
    gaps = [lr for lr in tried if ok[0] < lr < ok[-1] and lr not in ok]
    return span + (f" (but diverged at {', '.join(f'{g:g}' for g in gaps)})" if gaps else "")


def make_table(results: dict) -> str:
    runs = results["runs"]
    names = optimizer_order(runs)
    lrs = sorted({r["lr"] for r in runs})
    best = best_runs(runs)
    by_key = {(r["optimizer"], r["lr"]): r for r in runs}

    def cell(r: dict | None) -> str:
        if r is None:
            return ""
        loss = "nan" if r["final_eval_loss"] is None else f"{r['final_eval_loss']:.3f}"
        if r["diverged"]:
            return f"diverged ({loss})"
        if best.get(r["optimizer"]) is r:
            loss = f"**{loss}**"
        return f"{loss} ({r['spikes']})"

    lines = [
        "| optimizer | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for n in names:
        lines.append(f"| {LABELS.get(n, n)} | " + " | ".join(cell(by_key.get((n, lr))) for lr in lrs) + " |")
    summary = [
        "| optimizer | best lr | final eval loss | spikes at best lr | spikes, all non-diverged runs "
        "| lrs that did not diverge "
        "| s/run (best lr) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        b = best.get(n)
        mine = [r for r in runs if r["optimizer"] == n]
        all_spikes = sum(r["spikes"] for r in mine if not r["diverged"])
        if b is None:
            summary.append(f"| {LABELS.get(n, n)} | - | - | - | {all_spikes} | none | - |")
            continue
        tried = sorted(r["lr"] for r in mine)
        edge = " (edge of the sweep)" if len(tried) > 1 and b["lr"] in (tried[0], tried[-1]) else ""
        summary.append(
            f"| {LABELS.get(n, n)} | {b['lr']:g}{edge} | {b['final_eval_loss']:.3f} | {b['spikes']} | {all_spikes} | "
            f"{stable_range(runs, n)} | {b['train_s']:.1f} |"
        )
    c, d = results["config"], results["definitions"]
    return "\n".join(
        [
            f"Final eval loss (nats/byte, {c['eval_batches']} fixed held-out batches) after {c['steps']} steps, "
            f"and in parentheses the number of loss spikes; best lr per optimizer in bold; `diverged (x)`: x is the "
            f"eval loss where the run stopped. Initial eval loss {results['initial_eval_loss']:.3f}, unigram "
            f"baseline {results['unigram_baseline']:.3f}. {results['n_params']:,} parameters, "
            f"{results['tokens_per_step']} tokens/step, seed {c['seed']}.",
            "",
            *lines,
            "",
            *summary,
            "",
            f"- diverged: {d['diverged']}",
            f"- spike: {d['spike']}",
        ]
    )


def plot_sweep(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    init = results["initial_eval_loss"]
    finite = [r["final_eval_loss"] for r in runs if r["final_eval_loss"] is not None and not r["diverged"]]
    ceiling = init * 1.03
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, n in enumerate(optimizer_order(runs)):
        rs = sorted((r for r in runs if r["optimizer"] == n), key=lambda r: r["lr"])
        color = f"C{i}"
        ys = [ceiling if r["final_eval_loss"] is None else min(r["final_eval_loss"], ceiling) for r in rs]
        ax.plot([r["lr"] for r in rs], ys, "-", color=color, alpha=0.8, label=LABELS.get(n, n))
        ok = [(r["lr"], y) for r, y in zip(rs, ys) if not r["diverged"]]
        bad = [(r["lr"], y) for r, y in zip(rs, ys) if r["diverged"]]
        if ok:
            ax.plot(*zip(*ok), "o", color=color)
        if bad:
            ax.plot(*zip(*bad), "x", color=color, markersize=9, markeredgewidth=2)
    ax.axhline(init, ls=":", c="gray", lw=1, label=f"initial loss {init:.2f}")
    ax.axhline(results["unigram_baseline"], ls="--", c="gray", lw=1, label="unigram baseline")
    ax.plot([], [], "x", c="k", label="diverged (clipped to top)")
    ax.set_xscale("log")
    low = min([*finite, results["unigram_baseline"]])
    ax.set_ylim(low - 0.1, ceiling + 0.05)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final eval loss (nats/byte)")
    ax.set_title(f"LR sweep: final eval loss after {results['config']['steps']} steps")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_png(fig, path)


def plot_curves(results: dict, path: Path, smooth: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    best = best_runs(runs)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lows = []
    for i, n in enumerate(optimizer_order(runs)):
        if n not in best:
            continue
        ys = [v for v in best[n]["train_losses"] if v is not None]
        k = max(1, min(smooth, len(ys)))
        avg = [sum(ys[max(0, t - k + 1) : t + 1]) / len(ys[max(0, t - k + 1) : t + 1]) for t in range(len(ys))]
        ax.plot(range(len(ys)), ys, color=f"C{i}", alpha=0.15, lw=0.8)
        ax.plot(range(len(ys)), avg, color=f"C{i}", lw=1.5, label=f"{LABELS.get(n, n)}, lr {best[n]['lr']:g}")
        lows.append(min(avg))
    ax.axhline(results["unigram_baseline"], ls="--", c="gray", lw=1, label="unigram baseline")
    if lows:
        ax.set_ylim(min(lows) - 0.15, results["initial_eval_loss"] + 0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (nats/byte; bold: mean of last {smooth} steps)")
    ax.set_title("Training loss at each optimizer's best learning rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """Save at 100 dpi, then (when Pillow is there, as it is with matplotlib) as a 128-colour palette PNG:
    a third of the bytes, which keeps the plots small enough to commit."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    try:
        from PIL import Image

        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
    except Exception:  # the full-colour PNG is already written
        pass


def write_outputs(results: dict, out: Path) -> None:
    (out / "table.md").write_text(make_table(results) + "\n")
    plot_sweep(results, out / "lr_sweep.png")
    plot_curves(results, out / "curves.png")


def save_json(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
    tmp.replace(out / "results.json")


# ---------------------------------------------------------------------------------------------- main


def parse_lrs_for(text: str) -> tuple[str, list[float]]:
    name, _, values = text.partition("=")
    name = name.strip().lower()
    if name not in ALL_OPTIMIZERS or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=LR,LR,... with NAME in {', '.join(ALL_OPTIMIZERS)}")
    return name, [float(v) for v in values.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--optimizers", nargs="+", choices=ALL_OPTIMIZERS, default=list(DEFAULT_OPTIMIZERS))
    ap.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
        help="peak lrs for the Adam-type rules (adams, adamw, adamatan2)",
    )
    ap.add_argument(
        "--lrs-srf",
        nargs="+",
        type=float,
        default=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
        help="peak lrs for the SRF-type rules (adamsrf, homeadam, homeadamew), which step by m/v, "
        "not m/sqrt(v): their useful range is orders of magnitude below Adam's",
    )
    ap.add_argument(
        "--lrs-sgd",
        nargs="+",
        type=float,
        default=[1e-2, 3e-2, 1e-1, 3e-1, 1.0],
        help="peak lrs for SGD with momentum 0.9 (steps by lr*g: needs far larger lrs than Adam)",
    )
    ap.add_argument(
        "--lrs-for",
        action="append",
        type=parse_lrs_for,
        metavar="NAME=LR,LR,...",
        help="lr list for one optimizer, overriding the three above (repeatable)",
    )
    ap.add_argument("--steps", type=int, default=600)
    gpt.add_gpt_flags(ap)
    ap.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine (as train_gpt.py)")
    ap.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of the peak lr")
    ap.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="on matrices, for the adams_dist rules (decoupled; spectral for adams)",
    )
    ap.add_argument(
        "--betas",
        nargs=2,
        type=float,
        metavar=("B1", "B2"),
        help="betas for every adams_dist rule (default: each rule's own, (0.9, 0.95) for adams, (0.9, 0.999) for "
        "the others)",
    )
    ap.add_argument(
        "--sgd-weight-decay",
        type=float,
        default=0.0,
        help="L2 weight decay on matrices for SGD (torch's coupled form; default off)",
    )
    ap.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="model parameters' dtype (the optimizers keep fp32 masters unless --no-master)")
    ap.add_argument("--moment-dtype", choices=["float32", "bfloat16", "8bit"], default="float32",
                    help="adams_dist optimizers' moment_dtype")
    ap.add_argument("--no-master", action="store_true",
                    help="adams_dist optimizers with master_dtype=None (needs --param-dtype bfloat16)")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="max global grad norm, 0: off (all optimizers)")
    ap.add_argument("--spike-window", type=int, default=20, help="W of the spike rule")
    ap.add_argument("--spike-rel", type=float, default=0.25, help="R of the spike rule")
    ap.add_argument(
        "--abort-factor",
        type=float,
        default=3.0,
        help="stop a run (diverged) once its train loss exceeds this x the initial train loss",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on small shared machines)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    ap.add_argument("--out", default="runs/compare", help="output directory")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (well under a minute): tiny model (1 layer, d 32), 60 steps, same lr lists; explicit flags win",
    )
    ap.add_argument("--replot", action="store_true", help="only rewrite table.md and the PNGs from results.json")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    if ap.parse_args(argv).quick:
        ap.set_defaults(**QUICK)
    args = ap.parse_args(argv)
    if args.steps <= args.spike_window:
        print(f"note: --steps {args.steps} <= --spike-window {args.spike_window}: no spike can be counted")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.replot:
        results = json.loads((out / "results.json").read_text())
        write_outputs(results, out)
        print((out / "table.md").read_text())
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    setup = Setup(args)
    plan = [(n, lr) for n in args.optimizers for lr in lr_list(n, args)]
    config = {k: v for k, v in vars(args).items() if k not in ("replot",)}
    results: dict[str, Any] = {
        "command": " ".join(["python", "examples/compare.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": config,
        "machine": machine(),
        "n_params": setup.n_params,
        "tokens_per_step": args.batch_size * args.block_size,
        "train_bytes": setup.train_bytes,
        "val_bytes": setup.val_bytes,
        "initial_eval_loss": setup.initial_eval,
        "initial_train_loss": setup.initial_train,
        "unigram_baseline": setup.unigram,
        "definitions": {
            "diverged": f"a non-finite train loss; a train loss above {args.abort_factor:g} x the initial train "
            f"loss (run stopped there); or a final eval loss that is non-finite or above the initial eval loss",
            "spike": f"a step t >= {args.spike_window} whose train loss exceeds {1 + args.spike_rel:g} x the "
            f"median train loss of the {args.spike_window} previous steps; consecutive flagged steps count once",
        },
        "complete": False,
        "runs": [],
    }
    print(
        f"{setup.n_params / 1e6:.3f}M params, {args.steps} steps x {results['tokens_per_step']} tokens, "
        f"{len(plan)} runs, {torch.get_num_threads()} thread(s) on {args.device}; initial eval loss "
        f"{setup.initial_eval:.3f}, unigram {setup.unigram:.3f}"
    )
    bar = tqdm(plan, desc="runs", unit="run", dynamic_ncols=True, mininterval=1.0)
    for name, lr in bar:
        run = train_one(setup, name, lr, bar)
        results["runs"].append(run)
        save_json(results, out)  # partial results survive an interrupted sweep
        loss = "nan" if run["final_eval_loss"] is None else f"{run['final_eval_loss']:.4f}"
        tqdm.write(
            f"{name:>10} lr {lr:<8g} eval {loss:>7}  spikes {run['spikes']:<2} {run['train_s']:6.1f}s"
            + (f"  DIVERGED: {run['diverged_reason']}" if run["diverged"] else "")
        )
    bar.close()
    results["complete"] = True
    results["wall_s"] = time.perf_counter() - t_start
    results["machine_end"] = machine()
    save_json(results, out)
    write_outputs(results, out)
    print()
    print((out / "table.md").read_text())
    print(f"{len(plan)} runs in {results['wall_s']:.0f}s; results in {out}/ (results.json, table.md, *.png)")


if __name__ == "__main__":
    main()
