"""Engine behaviours users rely on beyond the update math."""

from __future__ import annotations

import math

import pytest
import torch
from rule_table import BY_NAME, hp_of

import adams_dist


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Parameter(torch.ones(4, 3)),
    lambda: torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16)),
    lambda: torch.nn.Parameter(torch.ones(3, 4).t()),  # non-contiguous
], ids=["fp32", "bf16", "noncontiguous"])
def test_parameters_edited_after_construction_are_adopted(make) -> None:
    """Loading weights into the model after building the optimizer must not be undone by step()."""
    p = make()
    opt = adams_dist.AdamW([p], lr=0.0, weight_decay=0.0)
    with torch.no_grad():
        p.fill_(5.0)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(p.detach().float(), torch.full(p.shape, 5.0))
    assert torch.equal(opt.state_dict()["state"][0]["master_param"], torch.full(p.shape, 5.0))


def test_atan2_b_zero_is_sign_descent() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = adams_dist.AdamATan2([p], lr=0.1, b=0.0, weight_decay=0.0)
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    step = 0.1 / (1 - 0.9) * math.pi / 2  # atan2(m, 0) = pi/2 * sign(m); 1/c1 outside
    torch.testing.assert_close(p.detach(), torch.tensor([1 - step, 1 + step, 1.0]))


@pytest.mark.parametrize("kw", [dict(a=-1.0), dict(a=0.0), dict(b=-1.0), dict(eps=None)])
def test_bad_scalars_rejected(kw) -> None:
    name = "adamw" if "eps" in kw else "adamatan2"
    with pytest.raises(ValueError, match=next(iter(kw))):
        adams_dist.create_optimizer(name, [torch.nn.Parameter(torch.ones(2))], **kw)


def test_clipping_scales_local_grads_consistently() -> None:
    """In one process max_grad_norm rescales p.grad in place, whatever the dtype (as torch's clipping does)."""
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
        opt = adams_dist.AdamW([p], lr=0.1, max_grad_norm=1.0)
        p.grad = torch.full((4,), 2.0, dtype=dtype)  # norm 4
        opt.step()
        torch.testing.assert_close(p.grad.float(), torch.full((4,), 0.5), rtol=1e-2, atol=1e-3)
        assert float(opt.last_grad_norm) == pytest.approx(4.0)


def test_adams_positional_order_matches_adams_torch() -> None:
    """adams-torch: (params, master_dtype, process_group, lr, betas, weight_decay, scalar_vector_weight_decay)."""
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = adams_dist.Adams_ZeRO([p], torch.float32, None, 0.5, (0.8, 0.9), 0.2, 0.3)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["scalar_vector_weight_decay"]) == (
        0.5, (0.8, 0.9), 0.2, 0.3)
    with pytest.raises(TypeError, match="master_dtype"):
        adams_dist.Adams_ZeRO([p], 1e-3)  # lr passed where adams-torch expects master_dtype


def test_unknown_keyword_names_the_class() -> None:
    with pytest.raises(TypeError, match=r"HomeAdam got unexpected keyword argument\(s\) \['foreach'\]"):
        adams_dist.HomeAdam([torch.nn.Parameter(torch.ones(2))], foreach=True)


@pytest.mark.parametrize("name,hp", [(n, hp_of("kernel")[n]) for n in ("adams", "adamatan2", "adamw")]
                         + [("adamatan2", BY_NAME["adamatan2"].hp["sign"])])
def test_large_tensor_path_equals_foreach_path(name, hp, monkeypatch) -> None:
    """Tensors above COMPILED_MIN_NUMEL stream through a scratch buffer; same numbers as the foreach ops."""
    import adams_dist.rules as rules

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 200), (7, 5), (70000,)]]
        opt = adams_dist.create_optimizer(name, params, kernel="foreach", **hp)
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    streamed = run()
    monkeypatch.setattr(rules, "COMPILED_MIN_NUMEL", 1 << 40)  # everything through the foreach ops
    foreach = run()
    for a, b in zip(streamed, foreach):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
