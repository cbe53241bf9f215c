"""step() reads the device to the host once on its default path (the control decisions), plus the
documented extras: HomeAdam's group min, a GradScaler's scale. Counted by wrapping every Tensor
method that hands a value to Python; the step counters are host (CPU) tensors, as in torch's
optimizers, and are not counted."""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import adams_dist
from adams_dist.testing import run

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def _host_reads(skip: set[int]) -> Iterator[collections.Counter]:
    """Count, by adams_dist source line, reads of tensors to Python (``skip``: ids of tensors not counted)."""
    sites: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(self, *args, **kwargs):
            if id(self) not in skip:
                frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/adams_dist/" in f.filename),
                             None)
                sites[f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "outside"] += 1
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield sites
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _reads_per_step(rank: int, world: int, name: str, options: dict, scaler: bool) -> dict[str, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 13), nn.Tanh(), nn.Linear(13, 5))
    opt = adams_dist.create_optimizer(name, model.parameters(), lr=1e-2, weight_decay=0.1, **options)
    amp = torch.amp.GradScaler("cpu") if scaler else None
    for step in range(3):
        loss = model(torch.randn(4, 8)).square().mean()
        (amp.scale(loss) if amp else loss).backward()
        if step < 2:  # warm-up: state is built, the first-step checks are done
            amp.step(opt) if amp else opt.step()
        else:
            counters = {id(st["step"]) for st in opt.state.values()}
            with _host_reads(counters) as sites:
                amp.step(opt) if amp else opt.step()
        if amp:
            amp.update()
        opt.zero_grad()
    return dict(sites)


CASES = [  # rule, engine options, GradScaler, host reads expected per step
    ("adams", {}, False, 1),
    ("adams", {"max_grad_norm": 1.0, "skip_nonfinite": True}, False, 1),
    ("adamatan2", {}, False, 1),
    ("adamw", {}, False, 1),
    ("adamsrf", {}, False, 1),
    ("homeadamew", {}, False, 1),
    ("homeadam", {}, False, 2),  # the group min of v_hat decides the whole group's update
    ("adams", {}, True, 2),  # the loss scale
]


@pytest.mark.parametrize("name,options,scaler,expected", CASES)
def test_host_reads_per_step_in_one_process(name: str, options: dict, scaler: bool, expected: int) -> None:
    sites = _reads_per_step(0, 1, name, options, scaler)
    assert sum(sites.values()) == expected, sites


@pytest.mark.parametrize("overlap", [False, True])
def test_host_reads_per_step_at_w2(overlap: bool) -> None:
    for sites in run(_reads_per_step, 2, "adams", {"overlap": overlap, "bucket_mb": 1e-4}, False, timeout=120):
        assert sum(sites.values()) == 1, sites
