"""The compiled element-wise kernels equal the foreach path; `python -m adams_dist info` reports the machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rule_table import hp_of

import adams_dist
from adams_dist.rules import COMPILED_MIN_NUMEL, compile_supported

# The last five are big enough to compile: a plain matrix, a batch of 3 matrices, a (4*64, 160)
# weight split into 4 heads by set_heads, a matrix excluded from spectral decay (scalar decay), and a
# (160, 4*64) weight whose 4 heads are column blocks (set_heads dim=1).
SHAPES = [(7, 5), (3, 5, 7), (13,), (), (64, 33), (256, 160), (3, 128, 96), (256, 160), (320, 128), (160, 256)]


def make_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    adams_dist.set_heads(params[7], 4)
    params[8].use_spectral_decay = False  # type: ignore[attr-defined]
    adams_dist.set_heads(params[9], 4, dim=1)
    return params


def trajectory(name: str, kernel: str, **hp) -> tuple[list[torch.Tensor], str]:
    params = make_params()
    opt = adams_dist.create_optimizer(name, params, kernel=kernel, **hp)
    for step in range(6):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params], opt.kernel_path


@pytest.mark.skipif(not compile_supported(torch.device("cpu")), reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("name,hp", list(hp_of("kernel").items()))  # every rule with a compiled kernel
def test_compiled_matches_foreach(name: str, hp: dict) -> None:
    fast, path = trajectory(name, "compiled", **hp)
    slow, slow_path = trajectory(name, "foreach", **hp)
    assert (path, slow_path) == ("compiled", "foreach")
    assert max(torch.Size(s).numel() for s in SHAPES) >= COMPILED_MIN_NUMEL  # torch.compile really ran
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    start = make_params()
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(fast, start))  # the kernels really moved every param


def test_rules_without_kernel_say_foreach() -> None:
    opt = adams_dist.HomeAdam([torch.nn.Parameter(torch.ones(3))], kernel="compiled")
    assert opt.kernel_path == "foreach"  # no fused kernel for this rule: the foreach path, never another rule


def test_bad_kernel_name() -> None:
    with pytest.raises(ValueError, match="kernel must be one of"):
        adams_dist.AdamW([torch.nn.Parameter(torch.ones(3))], kernel="triton-magic")


def test_info_cli_json() -> None:
    out = subprocess.run([sys.executable, "-m", "adams_dist", "info", "--json"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    data = json.loads(out)
    assert data["torch"] == torch.__version__
    assert data["distributed_backends"]["gloo"] is torch.distributed.is_gloo_available()
    assert set(data["kernel_path (kernel='auto', default device)"]) == adams_dist.optimizers.BUILTIN  # a fresh process
    assert data["world_size"] == 1
    text = subprocess.run([sys.executable, "-m", "adams_dist", "info"], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert "torch: " + torch.__version__ in text
    assert adams_dist.info()["devices"]["cpu"] is True


@pytest.mark.skipif(not compile_supported(torch.device("cpu")), reason="no C++ compiler for torch.compile")
def test_torch_compile_of_a_whole_training_step() -> None:
    """torch.compile(train_step) with optimizer.step() inside runs and follows the eager trajectory."""
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 4)

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        return model, adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2)

    def train_step(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    eager, compiled = make(), make()
    step = torch.compile(train_step)
    for _ in range(4):
        a, b = train_step(*eager), step(*compiled)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float(compiled[1].state[next(compiled[0].parameters())]["step"]) == 4


def test_every_kernel_has_its_own_code_object() -> None:
    """torch.compile keeps a bounded number of graphs per code object (8 by default); kernels sharing one
    would hit it after a few rules/dtypes and then fail with fullgraph=True."""
    from adams_dist import rules
    from adams_dist.rules.compiled import compiled_kernel

    elementwise = [r for r in map(rules.get, rules.names()) if isinstance(r, rules.ElementwiseRule)]
    counts = [(1, 0), (0, 1), (2, 0), (0, 2)]  # (flat pieces, rank-1 pieces) per call
    wrappers = [compiled_kernel(r.name, r.rule_fn, *c) for r in elementwise for c in counts]
    originals = [w._torchdynamo_orig_callable for w in wrappers]
    codes = {f.__code__ for f in originals}
    assert len(codes) == len(wrappers) == len(counts) * len(elementwise) >= 16
    assert len({c.co_name for c in codes}) == len(codes)
