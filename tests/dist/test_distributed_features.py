"""Distributed engine features in real gloo processes: collective counts and bytes, overlap, gradient
accumulation, unused parameters, init-time consistency checks, clipping, the non-finite guard,
low-precision gradient communication and world size 1.

Every spawn costs seconds, so each worker checks several things and returns plain data; the
assertions (and the single-process references) live in the test functions.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from adams_dist.testing import run
from rule_table import BY_NAME, hp_of
from torch import nn

import adams_dist
from adams_dist.control import AGREEMENT

SHAPES = [(7, 5), (13,), (3, 5, 7), (6, 4), (11,)]
SMALL_BUCKET_MB = 2e-4  # ~200 bytes: several buckets even for these tiny tensors


# ----------------------------------------------------------------------------- shared helpers


def make_params(shapes, seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def rank_grad(step: int, rank: int, index: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(100_000 * step + 1_000 * rank + index)
    return torch.randn(shape, generator=g) * (1.0 + 0.5 * rank)


def averaged_grad(step: int, world: int, index: int, shape) -> torch.Tensor:
    return torch.stack([rank_grad(step, r, index, shape) for r in range(world)]).mean(0)


def clone_all(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


class MLP(nn.Module):
    """Odd sizes on purpose: every parameter needs padding at W = 2."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(13, 7)
        self.l2 = nn.Linear(7, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor, probe=None) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if probe is not None:
            h.register_hook(probe)  # runs mid-backward, after l2/norm grads and before l1's
        return self.norm(self.l2(h))


def mlp(seed: int) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP()


def mlp_loss(model: MLP, step: int, rank: int, micro: int = 0, probe=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(7_000 * step + 100 * rank + micro)
    x, y = torch.randn(6, 13, generator=g), torch.randn(6, 5, generator=g)
    return ((model(x, probe) - y) ** 2).mean()


# ----------------------------------------------------------------------------- 1 + 9: collectives and bytes


ADAMW, ADAMS, HOMEADAM = BY_NAME["adamw"], BY_NAME["adams"], BY_NAME["homeadam"]
COUNT_CONFIGS = {
    # name: (rule, hyperparameters and engine options, number of param groups)
    "adamw": (ADAMW, dict(lr=1e-2), 1),
    "adams": (ADAMS, dict(lr=1e-2), 1),
    "homeadam_1group": (HOMEADAM, dict(lr=1e-3), 1),
    "homeadam_2groups": (HOMEADAM, dict(lr=1e-3), 2),
    "homeadam_2groups_per_tensor": (HOMEADAM, dict(lr=1e-3, per_tensor=True), 2),
    "adamw_bf16": (ADAMW, dict(lr=1e-2, grad_comm_dtype=torch.bfloat16), 1),
    "adams_bf16": (ADAMS, dict(lr=1e-2, grad_comm_dtype=torch.bfloat16), 1),
}
COUNT_STEPS = 4


def _groups(params: list[nn.Parameter], n_groups: int) -> list[dict]:
    if n_groups == 1:
        return [{"params": params}]
    return [{"params": params[:2]}, {"params": params[2:], "lr": 5e-4}]


def _counting_worker(rank: int, world: int) -> dict:
    out = {}
    for name, (rule, hyper, n_groups) in COUNT_CONFIGS.items():
        params = make_params(SHAPES, seed=0)
        opt = rule.cls(_groups(params, n_groups), bucket_mb=SMALL_BUCKET_MB, **hyper)
        colls, sent = [], []
        for step in range(COUNT_STEPS):
            for i, p in enumerate(params):
                p.grad = rank_grad(step, rank, i, p.shape)
            c0, b0 = opt.collectives_issued, opt.bytes_sent
            opt.step()
            colls.append(opt.collectives_issued - c0)
            sent.append(opt.bytes_sent - b0)
            opt.zero_grad()
        out[name] = {
            "colls": colls,
            "bytes": sent,
            "sections": [b.section_numel for b in opt._shards.buckets],
            "bucket_numels": [sum(s.param.numel() for s in b.slots) for b in opt._shards.buckets],
            "params": clone_all(params),
        }
    return out


def _spectral_control_numel(shapes) -> int:
    """Floats of W^T u partials in the control all-reduce: heads * cols per spectral matrix."""
    total = 0
    for s in shapes:
        if len(s) >= 2 and s[-1] != 1 and s[-2] != 1:
            total += math.prod(s[:-2]) * s[-1]
    return total


def test_collectives_and_bytes_per_step() -> None:
    world = 2
    results = run(_counting_worker, world, timeout=180)
    for name, (rule, hyper, n_groups) in COUNT_CONFIGS.items():
        for rank, res in enumerate(results):
            got = res[name]
            n_buckets = len(got["sections"])
            assert n_buckets >= 3, (name, got["sections"])
            # every bucket holds its params plus less than one padding element per rank per param
            for sec, numel in zip(got["sections"], got["bucket_numels"]):
                assert numel <= sec * world < numel + world * len(SHAPES), (name, sec, numel)

            homeadam = rule is HOMEADAM
            expected_colls = 2 * n_buckets + 1 + (n_groups if homeadam else 0)
            assert got["colls"] == [expected_colls] * COUNT_STEPS, (name, rank, got["colls"], n_buckets)

            comm_el = 2 if hyper.get("grad_comm_dtype") == torch.bfloat16 else 4
            frac = (world - 1) / world
            rs = sum(int(world * s * comm_el * frac) for s in got["sections"])  # reduce-scatter of padded grads
            ag = sum(int(world * s * 4 * frac) for s in got["sections"])  # all-gather of fp32 params
            # norm, has-grad flags, edited, found-inf and builds-pending flags, the agreement codes, the W^T u partials
            control_numel = (1 + len(SHAPES) + 3 + sum(AGREEMENT.values())
                             + (_spectral_control_numel(SHAPES) if rule is ADAMS else 0))
            control = int(2 * control_numel * 4 * frac)
            mins = 0
            if homeadam:
                per_group = [2, len(SHAPES) - 2] if n_groups == 2 else [len(SHAPES)]
                # HomeAdam's MIN all-reduce travels in float64 (8 bytes per value)
                mins = sum(int(2 * (k if hyper.get("per_tensor") else 1) * 8 * frac) for k in per_group)
            assert got["bytes"] == [rs + ag + control + mins] * COUNT_STEPS, (name, rank, got["bytes"])
            if comm_el == 4:
                ddp_ring = sum(2 * frac * world * s * 4 for s in got["sections"])  # all-reduce of padded grads
                assert 0 < got["bytes"][0] - ddp_ring == control + mins <= 8 * (control_numel + len(SHAPES))

    # 9: bf16 gradient communication: same collectives, close to fp32 comm (loose: bf16 rounds grads)
    for res in results:
        for base in ("adamw", "adams"):
            for p16, p32 in zip(res[base + "_bf16"]["params"], res[base]["params"]):
                torch.testing.assert_close(p16, p32, rtol=0, atol=5e-3)
            assert any(not torch.equal(a, b) for a, b in zip(res[base + "_bf16"]["params"], res[base]["params"]))
            for p, q in zip(res[base + "_bf16"]["params"], results[0][base + "_bf16"]["params"]):
                assert torch.equal(p, q)  # ranks agree bit for bit


# ----------------------------------------------------------------------------- 2 + 3: overlap and accumulation


def _train_mlp(rank: int, steps: int, overlap: bool, micro: int = 1, mode: str = "plain") -> dict:
    """mode: 'plain' (k backwards, then step), 'no_sync' (first k-1 backwards inside no_sync),
    'sum' (one backward of the sum of the k micro losses)."""
    model = mlp(seed=100 + rank)  # different init per rank: rank 0's wins at construction
    opt = adams_dist.Adams(model.parameters(), lr=1e-2, weight_decay=0.5, scalar_vector_weight_decay=0.3,
                           bucket_mb=1e-4, overlap=overlap)
    info: dict = {"mid": [], "after": [], "colls": []}

    def probe(grad: torch.Tensor) -> None:
        info["mid"].append(opt._shards.in_flight)

    for step in range(steps):
        c0 = opt.collectives_issued
        if mode == "sum":
            sum(mlp_loss(model, step, rank, k) for k in range(micro)).backward()
            info["after"].append(opt._shards.in_flight)
        else:
            for k in range(micro):
                last = k == micro - 1
                ctx = opt.no_sync() if mode == "no_sync" and not last else contextlib.nullcontext()
                with ctx:
                    mlp_loss(model, step, rank, k, probe if last else None).backward()
                info["after"].append(opt._shards.in_flight)
        opt.step()
        opt.zero_grad()
        info["colls"].append(opt.collectives_issued - c0)
    info["params"] = clone_all(model.parameters())
    info["n_buckets"] = len(opt._shards.buckets)
    return info


def _overlap_worker(rank: int, world: int) -> dict:
    out = {
        "sync": _train_mlp(rank, 10, overlap=False),
        "overlap": _train_mlp(rank, 10, overlap=True),
        "acc_no_sync": _train_mlp(rank, 4, overlap=True, micro=3, mode="no_sync"),
        "acc_plain": _train_mlp(rank, 4, overlap=False, micro=3, mode="plain"),
        "acc_sum": _train_mlp(rank, 4, overlap=False, micro=3, mode="sum"),
    }
    # A second backward in overlap mode without no_sync must fail loudly, then the optimizer recovers.
    model = mlp(seed=0)
    opt = adams_dist.AdamW(model.parameters(), lr=1e-2, bucket_mb=1e-4, overlap=True)
    mlp_loss(model, 0, rank).backward()
    try:
        mlp_loss(model, 0, rank, 1).backward()
        out["second_backward_error"] = None
    except RuntimeError as e:
        out["second_backward_error"] = str(e)
    opt.zero_grad()
    mlp_loss(model, 1, rank).backward()
    opt.step()
    out["recovered_params"] = clone_all(model.parameters())
    return out


def test_overlap_and_gradient_accumulation() -> None:
    results = run(_overlap_worker, 2, timeout=180)
    for rank, res in enumerate(results):
        sync, ovl = res["sync"], res["overlap"]
        n = ovl["n_buckets"]
        assert n >= 3
        # 2: overlap gives the same numbers as reducing everything inside step()
        for a, b in zip(ovl["params"], sync["params"]):
            assert torch.equal(a, b), (rank, (a - b).abs().max())
        for a, b in zip(ovl["params"], results[0]["overlap"]["params"]):
            assert torch.equal(a, b)
        # reduce-scatters were launched during backward: mid-backward some (not all) buckets are in
        # flight, right after backward all of them; without overlap none are launched before step()
        assert len(ovl["mid"]) == 10 and all(0 < m < n for m in ovl["mid"]), (ovl["mid"], n)
        assert ovl["after"] == [n] * 10
        assert sync["mid"] == [0] * 10 and sync["after"] == [0] * 10
        assert ovl["colls"] == sync["colls"] == [2 * n + 1] * 10

        # 3: accumulation over 3 micro-batches
        acc = res["acc_no_sync"]
        assert acc["after"] == [0, 0, n] * 4  # nothing reduced inside no_sync, all buckets after the last
        assert acc["colls"] == [2 * n + 1] * 4  # one reduction per optimizer step, not per micro-batch
        for a, b in zip(acc["params"], res["acc_plain"]["params"]):
            assert torch.equal(a, b), (rank, (a - b).abs().max())
        for a, b in zip(res["acc_plain"]["params"], res["acc_sum"]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

        err = res["second_backward_error"]
        assert err is not None and "no_sync" in err, err
        for a, b in zip(res["recovered_params"], results[0]["recovered_params"]):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- 4: unused parameters


UNUSED_SHAPES = [(7, 5), (13,), (3, 4), (6,), (4, 3)]  # #1: grad on rank 0 only; #3, #4: never a grad
UNUSED_STEPS = 4
UNUSED_RULES = hp_of("decay", ["adamw", "adams"])


def _unused_grads(step: int, rank: int, world: int | None = None) -> list[torch.Tensor | None]:
    """Rank ``rank``'s gradients, or (world given) the averaged gradients the ranks produce together."""
    out: list[torch.Tensor | None] = []
    for i, s in enumerate(UNUSED_SHAPES):
        if i in (3, 4):
            out.append(None)
        elif i == 1:
            g0 = rank_grad(step, 0, i, s)
            out.append(g0 / world if world else (g0 if rank == 0 else None))
        else:
            out.append(averaged_grad(step, world, i, s) if world else rank_grad(step, rank, i, s))
    return out


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.never = nn.Linear(4, 2)  # never used by anyone (first, so its buckets come last)
        self.trunk = nn.Linear(6, 5)
        self.extra = nn.Linear(6, 5)  # used on rank 0 only
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = self.trunk(x)
        if use_extra:
            h = h + self.extra(x)
        return self.head(torch.tanh(h))


def _train_branchy(rank: int, overlap: bool) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = Branchy()
    opt = adams_dist.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, bucket_mb=1e-4, overlap=overlap)
    after = []
    for step in range(5):
        g = torch.Generator().manual_seed(50 * step + rank)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        ((model(x, use_extra=rank == 0) - y) ** 2).mean().backward()
        after.append(opt._shards.in_flight)
        opt.step()
        opt.zero_grad()
    return {"params": dict((k, v.detach().clone()) for k, v in model.named_parameters()),
            "after": after, "n_buckets": len(opt._shards.buckets),
            "never_steps": [float(opt.state[p]["step"]) for p in model.never.parameters()]}


def _unused_worker(rank: int, world: int) -> dict:
    out = {}
    for name, hyper in UNUSED_RULES.items():
        params = make_params(UNUSED_SHAPES, seed=0)
        opt = adams_dist.create_optimizer(name, params, bucket_mb=SMALL_BUCKET_MB, **hyper)
        for step in range(UNUSED_STEPS):
            for p, g in zip(params, _unused_grads(step, rank)):
                p.grad = g
            opt.step()
            opt.zero_grad()
        out[name] = {"params": clone_all(params), "steps": [float(opt.state[p]["step"]) for p in params]}
    out["branchy_sync"] = _train_branchy(rank, overlap=False)
    out["branchy_overlap"] = _train_branchy(rank, overlap=True)
    return out


def test_unused_parameters() -> None:
    world = 2
    results = run(_unused_worker, world, timeout=180)
    for name, hyper in UNUSED_RULES.items():
        ref = make_params(UNUSED_SHAPES, seed=0)
        start = clone_all(ref)
        opt = adams_dist.create_optimizer(name, ref, **hyper)  # one process, averaged gradients
        for step in range(UNUSED_STEPS):
            for p, g in zip(ref, _unused_grads(step, 0, world)):
                p.grad = g
            opt.step()
            opt.zero_grad()
        for rank, res in enumerate(results):
            got = res[name]
            for i, (p, e) in enumerate(zip(got["params"], ref)):
                torch.testing.assert_close(p, e.detach(), rtol=1e-5, atol=2e-6,
                                           msg=lambda m, i=i, r=rank: f"{name} rank {r} param {i}: {m}")
            # params without a gradient anywhere are untouched (no decay) and take no step
            for i in (3, 4):
                assert torch.equal(got["params"][i], start[i]), (name, i)
            assert got["steps"] == [UNUSED_STEPS, UNUSED_STEPS, UNUSED_STEPS, 0, 0], got["steps"]

    for rank, res in enumerate(results):
        sync, ovl = res["branchy_sync"], res["branchy_overlap"]
        for k, v in ovl["params"].items():
            assert torch.equal(v, sync["params"][k]), (rank, k)
            assert torch.equal(v, results[0]["branchy_overlap"]["params"][k]), (rank, k)
        assert ovl["never_steps"] == [0.0, 0.0]
        with torch.random.fork_rng():
            torch.manual_seed(3)
            init = Branchy()
        for k, v in init.never.named_parameters():
            assert torch.equal(ovl["params"]["never." + k], v.detach())
        assert not torch.equal(ovl["params"]["extra.weight"], init.extra.weight.detach())  # rank 0's grad counts
    # rank 1's hooks cannot launch the buckets from `extra` on, yet every bucket is in flight when backward
    # returns on every rank (as with DDP): nothing the user runs before step() can pair with them
    for rank, res in enumerate(results):
        assert res["branchy_overlap"]["after"] == [res["branchy_overlap"]["n_buckets"]] * 5, (rank, res)


def _frozen_worker(rank: int, world: int) -> dict:
    out = {}
    for overlap in (False, True):
        with torch.random.fork_rng():
            torch.manual_seed(5)
            model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        model[0].weight.requires_grad_(False)  # frozen, but still handed to the optimizer
        opt = adams_dist.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, bucket_mb=1e-4, overlap=overlap)
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)
            model(torch.randn(4, 5, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out[overlap] = clone_all(model.parameters())
    return out


def test_overlap_with_frozen_parameter() -> None:
    """torch optimizers accept parameters with requires_grad=False (they never get a gradient)."""
    results = run(_frozen_worker, 2, timeout=120)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        init = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    for res in results:
        assert torch.equal(res[True][0], init[0].weight.detach())
        for a, b in zip(res[True], res[False]):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- 5 + 6: init-time consistency


def _named(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, nn.Parameter]]:
    return [(k, nn.Parameter(torch.zeros(s))) for k, s in shapes.items()]


def _consistency_worker(rank: int, world: int) -> dict:
    out: dict = {}
    base = {"w": (4, 3), "b": (5,)}
    scenarios = {
        "extra_param": (dict(base, extra=(2,)) if rank == 1 else base, 1e-3),
        "other_shape": (dict(base, b=(6,)) if rank == 1 else base, 1e-3),
        "other_lr": (base, 2e-3 if rank == 1 else 1e-3),
    }
    for name, (shapes, lr) in scenarios.items():
        t0 = time.monotonic()
        try:
            adams_dist.AdamW(_named(shapes), lr=lr)
            out[name] = (None, time.monotonic() - t0)
        except ValueError as e:
            out[name] = (str(e), time.monotonic() - t0)

    # 6: rank 0's parameters win at construction; broadcast_buffers copies rank 0's buffers
    with torch.random.fork_rng():
        torch.manual_seed(rank)
        model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    bn = model[1]
    bn.running_mean.fill_(float(rank))
    bn.running_var.fill_(1.0 + rank)
    bn.num_batches_tracked.fill_(10 + rank)
    opt = adams_dist.Adams(model.parameters(), lr=1e-2)
    out["params_after_init"] = clone_all(model.parameters())
    out["buffers_before"] = clone_all(model.buffers())
    opt.broadcast_buffers(model.buffers())
    out["buffers_after"] = clone_all(model.buffers())
    return out


def test_init_consistency_checks() -> None:
    world = 3
    results = run(_consistency_worker, world, timeout=120)
    for rank, res in enumerate(results):
        for scenario, needles in {
            "extra_param": ["rank 1", "extra", "<missing>"],
            "other_shape": ["rank 1", "param b", "(5,)", "(6,)"],
            "other_lr": ["rank 1", "'lr', 0.001", "'lr', 0.002"],
        }.items():
            msg, elapsed = res[scenario]
            assert msg is not None, f"rank {rank}: no ValueError for {scenario}"
            for needle in needles:
                assert needle in msg, (rank, scenario, needle, msg)
            assert elapsed < 20, (scenario, elapsed)
        # the message is the same on every rank (rank 2 agrees with rank 0 but still fails)
        assert res["extra_param"][0] == results[0]["extra_param"][0]

    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    for rank, res in enumerate(results):
        for p, e in zip(res["params_after_init"], expected.parameters()):
            assert torch.equal(p, e.detach()), rank
        before_mean = res["buffers_before"][0]
        assert torch.equal(before_mean, torch.full((4,), float(rank)))
        mean, var, count = res["buffers_after"]
        assert torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.ones(4)), rank
        assert int(count) == 10 and count.dtype == torch.long


# ----------------------------------------------------------------------------- 7 + 8: clipping, non-finite guard


CLIP_SHAPES = [(7, 5), (13,), (3, 4)]
CLIP = 1.0  # the averaged gradients' norm is about 3-6: every step clips
CLIP_STEPS = 4
NAN_STEP = 3
GUARD_STEPS = 7


def _clip_and_guard_worker(rank: int, world: int) -> dict:
    out: dict = {}
    for mode in ("ctor", "method"):
        params = make_params(CLIP_SHAPES, seed=1)
        opt = adams_dist.AdamW(params, lr=1e-2, weight_decay=0.1, bucket_mb=SMALL_BUCKET_MB,
                               max_grad_norm=CLIP if mode == "ctor" else None)
        norms = []
        for step in range(CLIP_STEPS):
            for i, p in enumerate(params):
                p.grad = rank_grad(step, rank, i, p.shape)
            if mode == "method":
                returned = opt.clip_grad_norm_(CLIP)
                assert opt.last_grad_norm is returned or torch.equal(opt.last_grad_norm, returned)
            opt.step()
            norms.append(float(opt.last_grad_norm))
            opt.zero_grad()
        out[mode] = {"params": clone_all(params), "norms": norms}

    params = make_params(SHAPES, seed=2)
    opt = adams_dist.Adams(params, **ADAMS.hp["decay"], bucket_mb=SMALL_BUCKET_MB, skip_nonfinite=True)
    guard: dict = {"params": [], "steps": [], "skipped": [], "u": [], "norms": []}
    for step in range(GUARD_STEPS):
        for i, p in enumerate(params):
            p.grad = rank_grad(step, rank, i, p.shape)
        if step == NAN_STEP and rank == 1:
            params[2].grad[1, 2, 3] = float("nan")
        opt.step()
        opt.zero_grad()
        guard["params"].append(clone_all(params))
        guard["steps"].append([float(opt.state[p]["step"]) for p in params])
        guard["skipped"].append(opt.skipped_steps)
        guard["norms"].append(float(opt.last_grad_norm))
        sd = opt.state_dict()
        guard["u"].append([sd["state"][i]["u"].clone() for i in (0, 2, 3)])
    out["guard"] = guard
    return out


def test_clipping_and_nonfinite_guard() -> None:
    world = 2
    results = run(_clip_and_guard_worker, world, timeout=180)

    # 7: reference: torch.optim.AdamW on the averaged gradients, clipped by torch's clip_grad_norm_
    ref = make_params(CLIP_SHAPES, seed=1)
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    true_norms = []
    for step in range(CLIP_STEPS):
        for i, p in enumerate(ref):
            p.grad = averaged_grad(step, world, i, p.shape)
        true_norms.append(float(torch.nn.utils.clip_grad_norm_(ref, CLIP)))
        opt.step()
        opt.zero_grad()
    assert min(true_norms) > CLIP  # clipping is active on every step
    for rank, res in enumerate(results):
        for mode in ("ctor", "method"):
            got = res[mode]
            for n, e in zip(got["norms"], true_norms):
                assert math.isclose(n, e, rel_tol=1e-5), (rank, mode, got["norms"], true_norms)
            for p, e in zip(got["params"], ref):
                torch.testing.assert_close(p, e.detach(), rtol=1e-5, atol=1e-6)

    # 8: reference: one process on the averaged gradients, with the poisoned step left out
    ref = make_params(SHAPES, seed=2)
    opt = adams_dist.Adams(ref, **ADAMS.hp["decay"])
    for step in range(GUARD_STEPS):
        if step == NAN_STEP:
            continue
        for i, p in enumerate(ref):
            p.grad = averaged_grad(step, world, i, p.shape)
        opt.step()
        opt.zero_grad()
    for rank, res in enumerate(results):
        g = res["guard"]
        assert g["skipped"] == [0] * NAN_STEP + [1] * (GUARD_STEPS - NAN_STEP), (rank, g["skipped"])
        assert math.isnan(g["norms"][NAN_STEP]) and all(math.isfinite(n) for k, n in enumerate(g["norms"])
                                                         if k != NAN_STEP)
        for a, b in zip(g["params"][NAN_STEP], g["params"][NAN_STEP - 1]):
            assert torch.equal(a, b)  # nothing moved on the poisoned step
        for a, b in zip(g["u"][NAN_STEP], g["u"][NAN_STEP - 1]):
            assert torch.equal(a, b)  # spectral state did not advance either
        assert [s[0] for s in g["steps"]] == [1, 2, 3, 3, 4, 5, 6]
        assert all(len(set(s)) == 1 for s in g["steps"])
        for p, e in zip(g["params"][-1], ref):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p, e.detach(), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- 10: world size 1


def _single_rank_run(overlap: bool, name: str) -> dict:
    params = make_params(SHAPES, seed=4)
    opt = adams_dist.create_optimizer(name, [{"params": params[:2]}, {"params": params[2:]}], lr=1e-2,
                                      max_grad_norm=5.0, overlap=overlap)
    for step in range(5):
        for i, p in enumerate(params):
            p.grad = rank_grad(step, 0, i, p.shape)
        opt.step()
        opt.zero_grad()
    return {"params": clone_all(params), "colls": opt.collectives_issued, "bytes": opt.bytes_sent,
            "world": opt.world_size, "sigmas": [s.clone() for s in opt.spectral_sigmas().values()]}


def _world_one_worker(rank: int, world: int) -> dict:
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    return {"adams": _single_rank_run(False, "adams"), "homeadam": _single_rank_run(False, "homeadam"),
            "adams_overlap": _single_rank_run(True, "adams")}


def test_world_size_one_group() -> None:
    (res,) = run(_world_one_worker, 1, timeout=120)
    assert not torch.distributed.is_initialized()
    for key, name in (("adams", "adams"), ("homeadam", "homeadam"), ("adams_overlap", "adams")):
        expected = _single_rank_run(False, name)
        got = res[key]
        assert got["colls"] == 0 and got["bytes"] == 0 and got["world"] == 1
        for a, b in zip(got["params"], expected["params"]):
            assert torch.equal(a, b), key
        for a, b in zip(got["sigmas"], expected["sigmas"]):
            assert torch.equal(a, b), key
