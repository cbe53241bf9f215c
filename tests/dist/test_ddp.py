"""A model wrapped in DDP: the optimizer warns once while DDP still all-reduces, ddp_without_allreduce stops it.

W = 2 gloo processes, different data per rank. DDP's all-reduces are counted with torch's profiler
(gloo records each one as a ``gloo:all_reduce`` event) over forward and backward only, where DDP
communicates; the optimizer's own collectives run in ``step()``, outside the profiled region.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import adams_dist
from adams_dist.testing import run

STEPS = 3
HINT = "ddp_without_allreduce"  # every DDP warning names the fix


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def train(rank: int, pairs: list[tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict:
    """STEPS steps of each (forward module, optimizer) on this rank's data; DDP all-reduces and warnings."""
    all_reduces = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # "once" must come from the optimizer, not from the warnings registry
        for step in range(STEPS):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * step + rank))
            for net, opt in pairs:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    net(x).square().mean().backward()
                all_reduces += sum(e.name == "gloo:all_reduce" for e in prof.events())
                opt.step()
                opt.zero_grad()
    return {"all_reduces": all_reduces, "global_hooks": len(torch.nn.modules.module._global_forward_pre_hooks), "warnings": [str(w.message) for w in caught if HINT in str(w.message)],
            "categories": {w.category for w in caught if HINT in str(w.message)}}


def worker(rank: int, world: int, case: str) -> dict:
    plain = make_model()
    out = {"plain": train(rank, [(plain, adams_dist.Adams_ZeRO(plain.parameters(), lr=1e-2, weight_decay=0.1))])}
    out["plain"]["params"] = [p.detach().clone() for p in plain.parameters()]
    model = make_model()
    net = DDP(model)
    if case == "helper":
        assert adams_dist.ddp_without_allreduce(net) is net
        adams_dist.ddp_without_allreduce(net)  # a second call changes nothing
    if case == "beside":  # a plain model and a DDP-wrapped one, each with its own optimizer, in one process
        other = make_model(seed=1)
        pairs = [(other, adams_dist.Adams_ZeRO(other.parameters(), lr=1e-2)),
                 (net, adams_dist.AdamW(model.parameters(), lr=1e-2))]
    else:
        pairs = [(net, adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2, weight_decay=0.1))]
    out["wrapped"] = train(rank, pairs)
    out["wrapped"]["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def test_ddp_that_all_reduces_warns_once_and_trains_the_same():
    for rank, out in enumerate(run(worker, 2, "ddp")):
        assert out["wrapped"]["all_reduces"] > 0  # the counter sees DDP's all-reduces
        assert out["wrapped"]["global_hooks"] == 0  # the detection's forward hook is gone after the first step
        assert len(out["wrapped"]["warnings"]) == 1, (rank, out["wrapped"]["warnings"])
        assert out["wrapped"]["categories"] == {UserWarning}
        assert "Adams_ZeRO" in out["wrapped"]["warnings"][0] and "do not wrap" in out["wrapped"]["warnings"][0]
        for p, q in zip(out["wrapped"]["params"], out["plain"]["params"]):
            assert torch.equal(p, q)  # at W = 2 averaging an average is exact


def test_ddp_without_allreduce_communicates_nothing_and_does_not_warn():
    for rank, out in enumerate(run(worker, 2, "helper")):
        assert out["wrapped"]["all_reduces"] == 0, rank
        assert out["wrapped"]["warnings"] == [], rank
        for p, q in zip(out["wrapped"]["params"], out["plain"]["params"]):
            assert torch.equal(p, q)


def test_only_the_optimizer_of_the_ddp_model_warns():
    for rank, out in enumerate(run(worker, 2, "beside")):
        assert out["plain"]["warnings"] == [], rank  # a plain model alone, different data per rank
        assert len(out["wrapped"]["warnings"]) == 1, (rank, out["wrapped"]["warnings"])
        assert out["wrapped"]["warnings"][0].startswith("AdamW's parameters"), out["wrapped"]["warnings"]


def test_ddp_without_allreduce_takes_only_ddp():
    try:
        adams_dist.ddp_without_allreduce(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    except TypeError as e:
        assert "DistributedDataParallel" in str(e)
    else:
        raise AssertionError("a plain module was accepted")
