"""adams_dist against the published packages it replaces, and reference64 against them too.

- adams-torch 0.0.1 (`adams.Adams_ZeRO`) is the reference implementation of Adams.
- adam-atan2-pytorch (`adam_atan2_pytorch.AdamAtan2`) is the a/b, bias-correction-inside-atan2
  convention of AdamATan2.
- torch.optim.AdamW for AdamW.
The first block checks that tests/reference64.py itself agrees with those packages (so the other
test files compare adams_dist against something trustworthy); it does not need adams_dist.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

try:
    from tests.reference64 import Reference
    from tests.rule_table import BY_CLASS, TABLE
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference64 import Reference
    from rule_table import BY_CLASS, TABLE

F64 = torch.float64


def _adams_torch(params, **kw):
    """adams-torch warns about single-process mode on construction; that is expected here."""
    from adams import Adams_ZeRO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Adams_ZeRO(params, **kw)


def _max_diff(xs, ys):
    return max(float((x.detach().double() - y.detach().double()).abs().max()) if x.numel() else 0.0
               for x, y in zip(xs, ys))


# ------------------------------------------------------------------ reference64 vs packages
def test_reference64_adams_matches_adams_torch_fp64():
    g = torch.Generator().manual_seed(0)
    shapes = [(), (6,), (4, 6), (3, 5, 7), (1, 6), (6, 1), (2, 1, 5)]
    init = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # adams-torch keeps its step count in the default dtype
    try:
        mp = [nn.Parameter(p.clone()) for p in init]
        opt = _adams_torch(mp, lr=0.05, weight_decay=0.3, scalar_vector_weight_decay=0.2,
                           master_dtype=F64)
    finally:
        torch.set_default_dtype(old)
    ref = Reference("adams", init, lr=0.05, weight_decay=0.3, scalar_vector_weight_decay=0.2)
    for t in range(20):
        gs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
        if t % 3 == 1:
            gs[1] = None  # skipped entirely by both
            gs[3] = None
        for p, gr in zip(mp, gs):
            p.grad = None if gr is None else gr.clone()
        opt.step()
        ref.step(gs)
        assert _max_diff(mp, ref.params) < 1e-12
    assert ref.steps == [20, 13, 20, 13, 20, 20, 20]
    torch.testing.assert_close(opt.state[mp[3]]["sigma"], ref.sigmas[3], rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.state[mp[2]]["sigma"], ref.sigmas[2], rtol=1e-12, atol=0)
    assert ref.sigmas[0] is None and ref.sigmas[4] is None and ref.sigmas[6] is None


def test_reference64_first_step_size_is_atan_of_one_minus_beta1():
    # DESIGN: step 1 moves each element by lr*atan(1-b1)/(1-b1)*sign(g) (bias correction outside)
    lr, b1 = 0.01, 0.9
    x = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    ref = Reference("adams", [x], lr=lr, betas=(b1, 0.95), weight_decay=0.0, scalar_vector_weight_decay=0.0)
    grad = torch.tensor([0.3, -5.0, 0.0], dtype=F64)
    ref.step([grad])
    expected = x - lr * math.atan(1 - b1) / (1 - b1) * torch.sign(grad)
    torch.testing.assert_close(ref.params[0], expected, rtol=0, atol=1e-15)


def _steps_max_diff(opt, mp, ref, shapes, g, steps: int = 15) -> float:
    """Feed ``opt`` (on ``mp``) and the float64 reference the same random gradients; their largest gap."""
    for _ in range(steps):
        gs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
        for p, gr in zip(mp, gs):
            p.grad = gr.clone()
        opt.step()
        ref.step(gs)
    return _max_diff(mp, ref.params)


def test_reference64_adamatan2_matches_adam_atan2_pytorch_fp64():
    from adam_atan2_pytorch import AdamAtan2

    g = torch.Generator().manual_seed(1)
    shapes = [(5,), (4, 3), ()]
    init = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    mp = [nn.Parameter(p.clone()) for p in init]
    opt = AdamAtan2(mp, lr=0.02, betas=(0.9, 0.99), weight_decay=0.1, a=1.27, b=1.0)
    ref = Reference("adamatan2", init, lr=0.02, betas=(0.9, 0.99), weight_decay=0.1, a=1.27, b=1.0,
                    bias_correction_in_atan2=True)
    assert _steps_max_diff(opt, mp, ref, shapes, g) < 1e-13


def test_reference64_adamw_matches_torch_adamw_fp64():
    g = torch.Generator().manual_seed(2)
    shapes = [(5,), (4, 3), ()]
    init = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    mp = [nn.Parameter(p.clone()) for p in init]
    opt = torch.optim.AdamW(mp, lr=0.02, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, foreach=False)
    ref = Reference("adamw", init, lr=0.02, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1)
    assert _steps_max_diff(opt, mp, ref, shapes, g) < 1e-13


def test_reference64_homeadam_hand_values():
    # betas (0,0), eps 0: m = g, v = g^2, no bias correction. min v = 0.25 < tau 0.3 -> momentum SGD
    a, b = torch.tensor(10.0, dtype=F64), torch.tensor(10.0, dtype=F64)
    ref = Reference("homeadam", [a, b], lr=0.1, betas=(0.0, 0.0), eps=0.0, tau=0.3)
    ref.step([torch.tensor(2.0, dtype=F64), torch.tensor(0.5, dtype=F64)])
    assert [float(p) for p in ref.params] == pytest.approx([9.8, 9.95], abs=1e-14)
    ref = Reference("homeadam", [a, b], lr=0.1, betas=(0.0, 0.0), eps=0.0, tau=1e-12)
    ref.step([torch.tensor(2.0, dtype=F64), torch.tensor(0.5, dtype=F64)])
    assert [float(p) for p in ref.params] == pytest.approx([9.95, 9.8], abs=1e-14)


# ------------------------------------------------------------------ adams_dist vs adams-torch
class _Net(nn.Module):
    """A small MLP with a 3-D (heads, M, N) weight, biases, a norm and a scalar gain."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(16, 8, generator=g) / 8**0.5)
        self.b1 = nn.Parameter(torch.randn(16, generator=g) * 0.1)
        self.heads = nn.Parameter(torch.randn(2, 8, 8, generator=g) / 8**0.5)
        self.ln_w = nn.Parameter(1.0 + 0.1 * torch.randn(16, generator=g))
        self.ln_b = nn.Parameter(0.1 * torch.randn(16, generator=g))
        self.w2 = nn.Parameter(torch.randn(4, 16, generator=g) / 4)
        self.b2 = nn.Parameter(torch.randn(4, generator=g) * 0.1)
        self.gain = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        h = torch.tanh(x @ self.w1.t() + self.b1)
        h = torch.einsum("bhn,hmn->bhm", h.view(-1, 2, 8), self.heads).reshape(-1, 16)
        h = nn.functional.layer_norm(torch.tanh(h), (16,), self.ln_w, self.ln_b)
        return self.gain * (h @ self.w2.t() + self.b2)


def _data(n_steps: int, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)) for _ in range(n_steps)]


def test_adams_zero_matches_adams_torch_50_steps_mlp():
    import adams_dist

    m_ref, m_new = _Net(0), _Net(0)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.2, scalar_vector_weight_decay=0.05)
    o_ref = _adams_torch(list(m_ref.parameters()), **hp)
    o_new = adams_dist.Adams_ZeRO(m_new.parameters(), **hp)
    for x, y in _data(60):
        for m, o in ((m_ref, o_ref), (m_new, o_new)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        # not structurally zero: every parameter gets a real gradient
        assert all(float(p.grad.abs().min()) > 0 for p in m_new.parameters() if p.ndim)
        o_ref.step()
        o_new.step()
        for (name, a), b in zip(m_ref.named_parameters(), m_new.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    # the run actually moved the weights a long way from the start
    assert float((m_new.w1 - _Net(0).w1).detach().abs().max()) > 0.05
    # spectral sigmas agree with the reference's per-head sigma
    sig = o_new.spectral_sigmas()
    torch.testing.assert_close(sig[m_new.heads].float().reshape(-1), o_ref.state[m_ref.heads]["sigma"],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sig[m_new.w1].float().reshape(-1), o_ref.state[m_ref.w1]["sigma"].reshape(-1),
                               rtol=1e-5, atol=1e-6)


def test_adams_zero_weight_decay_zero_still_applies_scalar_vector_decay():
    """Documented difference: adams-torch skips scalar/vector decay when weight_decay == 0."""
    import adams_dist

    lr, svwd, n = 0.1, 0.5, 6
    x0 = torch.tensor([1.0, -2.0, 4.0])
    a, b = nn.Parameter(x0.clone()), nn.Parameter(x0.clone())
    o_new = adams_dist.Adams_ZeRO([a], lr=lr, weight_decay=0.0, scalar_vector_weight_decay=svwd)
    o_ref = _adams_torch([b], lr=lr, weight_decay=0.0, scalar_vector_weight_decay=svwd)
    for _ in range(n):
        a.grad = torch.zeros(3)  # atan2(0, 0) = 0: only the decay moves the weights
        b.grad = torch.zeros(3)
        o_new.step()
        o_ref.step()
    torch.testing.assert_close(a.detach(), x0 * (1 - lr * svwd) ** n, rtol=1e-6, atol=0)
    assert torch.equal(b.detach(), x0)  # the quirk we do not copy


def test_adams_zero_weight_decay_zero_matches_reference_with_gradients():
    import adams_dist

    g = torch.Generator().manual_seed(5)
    init = [torch.randn(7, generator=g), torch.randn(4, 5, generator=g)]
    ps = [nn.Parameter(p.clone()) for p in init]
    opt = adams_dist.Adams_ZeRO(ps, lr=0.05, weight_decay=0.0, scalar_vector_weight_decay=0.3)
    ref = Reference("adams", init, lr=0.05, weight_decay=0.0, scalar_vector_weight_decay=0.3)
    for _ in range(6):
        gs = [torch.randn(p.shape, generator=g) for p in ps]
        for p, gr in zip(ps, gs):
            p.grad = gr
        opt.step()
        ref.step(gs)
    for p, r in zip(ps, ref.params):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ AdamATan2 vs adam-atan2-pytorch
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamatan2_matches_adam_atan2_pytorch(wd):
    from adam_atan2_pytorch import AdamAtan2

    import adams_dist

    m_ref, m_new = _Net(1), _Net(1)
    o_ref = AdamAtan2(m_ref.parameters(), lr=3e-3, a=1.27, b=1.0, betas=(0.9, 0.99), weight_decay=wd)
    o_new = adams_dist.AdamATan2(m_new.parameters(), lr=3e-3, a=1.27, b=1.0, betas=(0.9, 0.99),
                                 bias_correction_in_atan2=True, weight_decay=wd)
    for x, y in _data(30, seed=7):
        for m, o in ((m_ref, o_ref), (m_new, o_new)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        o_ref.step()
        o_new.step()
    for (name, a), b in zip(m_ref.named_parameters(), m_new.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    assert float((m_new.w1 - _Net(1).w1).detach().abs().max()) > 0.02


def test_adamatan2_default_convention_first_step():
    """Fused adam-atan2 convention: bias correction outside atan2 -> step 1 is atan(1-b1)/(1-b1)."""
    import adams_dist

    lr, b1, wd = 0.01, 0.9, 0.1
    x0 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    p = nn.Parameter(x0.clone())
    opt = adams_dist.AdamATan2([p], lr=lr, betas=(b1, 0.999), weight_decay=wd)
    p.grad = torch.tensor([0.3, -5.0, 1e-3, 0.0])
    opt.step()
    sign = torch.tensor([1.0, -1.0, 1.0, 0.0])
    expected = x0 * (1 - lr * wd) - lr * math.atan(1 - b1) / (1 - b1) * sign
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ HomeAdam hand cases
def _scalars(*vals):
    return [nn.Parameter(torch.tensor(float(v))) for v in vals]


def _grads(ps, *vals):
    for p, v in zip(ps, vals):
        p.grad = torch.full_like(p, float(v))


def test_homeadam_group_decision_goes_home_to_sgd():
    import adams_dist

    ps = _scalars(10.0, 10.0)
    opt = adams_dist.HomeAdam(ps, lr=0.1, betas=(0.0, 0.0), eps=0.0, tau=0.3)
    _grads(ps, 2.0, 0.5)  # v_hat = 4 and 0.25; min 0.25 < 0.3 -> p -= lr*g for both
    opt.step()
    assert [float(p.detach()) for p in ps] == pytest.approx([9.8, 9.95], abs=1e-6)


def test_homeadam_group_decision_adaptive_when_min_above_tau():
    import adams_dist

    ps = _scalars(10.0, 10.0)
    opt = adams_dist.HomeAdam(ps, lr=0.1, betas=(0.0, 0.0), eps=0.0, tau=0.2)
    _grads(ps, 2.0, 0.5)  # min 0.25 >= 0.2 -> SRF: p -= lr*g/g^2 = lr/g
    opt.step()
    assert [float(p.detach()) for p in ps] == pytest.approx([9.95, 9.8], abs=1e-6)


def test_homeadam_per_tensor_decides_per_tensor():
    import adams_dist

    ps = _scalars(10.0, 10.0, 10.0)
    opt = adams_dist.HomeAdam(ps, lr=0.1, betas=(0.0, 0.0), eps=0.0, tau=0.3, per_tensor=True)
    _grads(ps, 2.0, 0.5, 4.0)
    opt.step()
    # tensor 0: 4 >= 0.3 -> SRF 10-0.1/2; tensor 1: 0.25 < 0.3 -> SGD 10-0.1*0.5; tensor 2: SRF 10-0.1/4
    assert [float(p.detach()) for p in ps] == pytest.approx([9.95, 9.95, 9.975], abs=1e-6)


def test_homeadam_decision_is_per_group_not_global():
    import adams_dist

    ps = _scalars(10.0, 10.0, 10.0, 10.0)
    opt = adams_dist.HomeAdam([dict(params=ps[:2]), dict(params=ps[2:])], lr=0.1, betas=(0.0, 0.0),
                              eps=0.0, tau=0.3)
    _grads(ps, 2.0, 0.5, 2.0, 1.0)
    opt.step()
    # group 0: min 0.25 < 0.3 -> SGD ; group 1: min 1 >= 0.3 -> SRF
    assert [float(p.detach()) for p in ps] == pytest.approx([9.8, 9.95, 9.95, 9.9], abs=1e-6)


def test_homeadam_zero_gradient_element_sends_group_to_sgd():
    import adams_dist

    a = nn.Parameter(torch.full((4,), 10.0))
    b = nn.Parameter(torch.full((3, 2), 10.0))
    opt = adams_dist.HomeAdam([a, b], lr=0.1, betas=(0.0, 0.0), eps=0.0, tau=1e-12)
    ga = torch.tensor([1.0, 2.0, 4.0, 0.5])
    gb = torch.tensor([[1.0, 2.0], [0.0, 4.0], [8.0, 0.25]])  # one exact zero in the other tensor
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(a.detach(), 10.0 - 0.1 * ga, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), 10.0 - 0.1 * gb, rtol=0, atol=1e-6)


def _random_run(cls, hp, steps=8, seed=11):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g)]
    ps = [nn.Parameter(p.clone()) for p in init]
    opt = cls(ps, **hp)
    gseq = []
    for _ in range(steps):
        gs = [torch.randn(p.shape, generator=g) for p in ps]  # no exact zeros: v_hat > 0
        gseq.append(gs)
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()
        opt.step()
    return init, gseq, [p.detach().clone() for p in ps]


def test_homeadam_tiny_tau_equals_adamsrf():
    import adams_dist

    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    _, _, home = _random_run(adams_dist.HomeAdam, dict(hp, tau=1e-12))
    _, _, srf = _random_run(adams_dist.AdamSRF, hp)
    for a, b in zip(home, srf):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    _, _, srf_ew = _random_run(adams_dist.HomeAdamEW, dict(hp, tau=1e-12))
    for a, b in zip(srf_ew, srf):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [r.class_name for r in TABLE if "tau" in r.defaults])  # the switching rules
def test_homeadam_huge_tau_equals_momentum_sgd(name):
    lr, b1, wd = 1e-2, 0.9, 0.05
    init, gseq, got = _random_run(BY_CLASS[name].cls,
                                  dict(lr=lr, betas=(b1, 0.999), eps=1e-8, tau=1e12, weight_decay=wd))
    # independent hand loop: momentum SGD with bias-corrected first moment and decoupled decay
    xs = [p.double() for p in init]
    ms = [torch.zeros_like(x) for x in xs]
    for t, gs in enumerate(gseq, start=1):
        for i, gr in enumerate(gs):
            ms[i] = b1 * ms[i] + (1 - b1) * gr.double()
            xs[i] = xs[i] * (1 - lr * wd) - lr * ms[i] / (1 - b1**t)
    for a, b in zip(got, xs):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
