"""docs/extending.md's Lion, in one process and sharded at world size 2, against an independent float64 Lion."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from adams_dist.rules import COMPILED_MIN_NUMEL, compile_supported
from adams_dist.testing import run

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
# (512, 160) keeps 40960 elements per rank at W = 2 (the large path); the rest take the small path.
SHAPES = [(512, 160), (300,), (7, 5), (64, 33)]
HP = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.3)
STEPS = 5
WORLD = 2


def doc_namespace() -> dict:
    """Every python block of docs/extending.md, run in order in one namespace (as tests/docs runs them).

    The namespace is a registered module's: torch.compile looks a function's globals up by its module name.
    """
    module = sys.modules["extending_md"] = types.ModuleType("extending_md")
    blocks = re.findall(r"^```python[^\n]*\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module.__dict__


def initial() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def grads(step: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(s, generator=g) * (1 + rank) for s in SHAPES]


def mean_grads(step: int) -> list[torch.Tensor]:
    return [torch.stack(gs).mean(0) for gs in zip(*(grads(step, r) for r in range(WORLD)))]


def lion64(grads_for_step) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Lion in float64, from the paper's formula. Also, per element, whether every sign it took was clear
    of rounding: where b1*m + (1-b1)*g is within 1e-6 of zero, float32 may take the other sign."""
    lr, (b1, b2), wd = HP["lr"], HP["betas"], HP["weight_decay"]
    ps = [p.double() for p in initial()]
    ms = [torch.zeros_like(p) for p in ps]
    clear = [torch.ones_like(p, dtype=torch.bool) for p in ps]
    for step in range(STEPS):
        for i, g in enumerate(grads_for_step(step)):
            c = b1 * ms[i] + (1 - b1) * g.double()
            clear[i] &= c.abs() > 1e-6
            ps[i] = ps[i] * (1 - lr * wd) - lr * torch.sign(c)
            ms[i] = b2 * ms[i] + (1 - b2) * g.double()
    return ps, clear


def train(lion_cls, grads_for_step, **engine) -> tuple[list[torch.Tensor], int]:
    """The params after STEPS steps, and how many elements of the first one this rank updated."""
    params = [torch.nn.Parameter(p) for p in initial()]
    opt = lion_cls(params, **HP, **engine)
    for step in range(STEPS):
        for p, g in zip(params, grads_for_step(step)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params], opt.state[params[0]]["exp_avg"].numel()


def lion_worker(rank: int, world: int) -> tuple[list[torch.Tensor], int]:
    return train(doc_namespace()["Lion"], lambda step: grads(step, rank))


def assert_matches(got: list[torch.Tensor], want: list[torch.Tensor], clear: list[torch.Tensor], what: str) -> None:
    for i, (a, b, ok) in enumerate(zip(got, want, clear)):
        assert float(ok.double().mean()) > 0.999  # almost every element is compared
        torch.testing.assert_close(a.double()[ok], b[ok], rtol=1e-5, atol=1e-5, msg=lambda s, i=i: f"{what} #{i}: {s}")


@pytest.mark.parametrize("kernel", ["foreach", "compiled"])
def test_doc_lion_one_process_matches_float64(kernel: str) -> None:
    if kernel == "compiled" and not compile_supported(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    want, clear = lion64(mean_grads)
    got, _ = train(doc_namespace()["Lion"], mean_grads, kernel=kernel)
    assert_matches(got, want, clear, f"one process, kernel={kernel}")


def test_doc_lion_sharded_at_world_size_2_matches_float64() -> None:
    want, clear = lion64(mean_grads)
    for rank, (got, local) in enumerate(run(lion_worker, WORLD, timeout=240)):
        assert_matches(got, want, clear, f"W={WORLD} rank {rank}")
        assert COMPILED_MIN_NUMEL <= local < torch.Size(SHAPES[0]).numel()  # sharded, and on the large path
    start = initial()
    assert all(float((w - s.double()).abs().min()) > 0 for w, s in zip(want, start))  # every element moved
