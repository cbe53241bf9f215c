"""Argument checks with clear messages, and the torch.optim.Optimizer contract in one process:
lr tensors, lr schedulers, add_param_group, closures, zero_grad, state_dict round trips, deepcopy,
no warnings."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import adams_dist

try:
    from tests.reference64 import Reference
    from tests.rule_table import TABLE
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference64 import Reference
    from rule_table import TABLE

ALL = [r.class_name for r in TABLE]
WITH_EPS = [r.class_name for r in TABLE if "eps" in r.defaults]
WITH_TAU = [r.class_name for r in TABLE if "tau" in r.defaults]
REF_NAME = {r.class_name: r.name for r in TABLE}


def _cls(name):
    return getattr(adams_dist, name)


def _p(*shape):
    return nn.Parameter(torch.randn(*shape))


# ------------------------------------------------------------------ defaults and hyperparameter checks
@pytest.mark.parametrize("rule", TABLE, ids=str)
def test_defaults_are_the_documented_ones(rule):
    """The class defaults are the rule table's (the float64 reference's, written from the docs)."""
    group = rule.cls([_p(3)]).param_groups[0]
    for key, value in rule.defaults.items():
        assert group[key] == value, f"{rule.class_name}: {key} is {group[key]!r}, the docs say {value!r}"
    assert adams_dist.create_optimizer(rule.name, [_p(3)]).__class__ is rule.cls


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("lr", [-1e-3, -1.0])
def test_negative_lr(name, lr):
    with pytest.raises(ValueError, match=r"(?i)learning rate|\blr\b"):
        _cls(name)([_p(3)], lr=lr)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("betas", [(1.0, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9, -0.5), (0.9, 1.5)])
def test_betas_outside_unit_interval(name, betas):
    with pytest.raises(ValueError, match=r"(?i)beta"):
        _cls(name)([_p(3)], betas=betas)


@pytest.mark.parametrize("name", ALL)
def test_negative_weight_decay(name):
    with pytest.raises(ValueError, match="weight_decay"):
        _cls(name)([_p(3)], weight_decay=-0.1)


def test_negative_scalar_vector_weight_decay():
    with pytest.raises(ValueError, match="scalar_vector_weight_decay"):
        adams_dist.Adams_ZeRO([_p(3)], scalar_vector_weight_decay=-0.1)


@pytest.mark.parametrize("name", WITH_EPS)
def test_negative_eps(name):
    with pytest.raises(ValueError, match="eps"):
        _cls(name)([_p(3)], eps=-1e-8)


@pytest.mark.parametrize("name", WITH_TAU)
@pytest.mark.parametrize("tau", [0.0, -1e-6])
def test_tau_must_be_positive(name, tau):
    with pytest.raises(ValueError, match="tau"):
        _cls(name)([_p(3)], tau=tau)


@pytest.mark.parametrize("name", ALL)
def test_bad_hyperparameter_in_a_param_group(name):
    """Per-group values are checked too, not only the constructor defaults."""
    with pytest.raises(ValueError, match=r"(?i)learning rate|\blr\b"):
        _cls(name)([dict(params=[_p(3)]), dict(params=[_p(2)], lr=-0.5)])


def test_adamatan2_negative_b_rejected():
    """b < 0 flips the sign of the atan2 denominator (steps uphill); it must be refused by name."""
    with pytest.raises(ValueError, match=r"\bb\b"):
        adams_dist.AdamATan2([_p(3)], b=-1.0)


def test_adamatan2_b_zero_is_sign_descent_or_rejected():
    """b = 0 is atan2(m, 0) = +-pi/2 in adam-atan2-pytorch; accept it that way or refuse it clearly,
    but never fail inside step() with a bare ZeroDivisionError."""
    p = nn.Parameter(torch.ones(3))
    try:
        opt = adams_dist.AdamATan2([p], lr=0.1, betas=(0.9, 0.999), b=0.0, weight_decay=0.0)
    except ValueError as e:
        assert "b" in str(e)
        return
    grad = torch.tensor([1.0, -2.0, 0.0])
    p.grad = grad.clone()
    opt.step()
    # atan2(m, 0) = sign(m)*pi/2, atan2(0, 0) = 0; default convention: step = lr/c1 * that
    expected = 1.0 - 0.1 / (1 - 0.9) * (torch.pi / 2) * torch.sign(grad)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_sparse_gradient_rejected_at_step(name):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = _cls(name)(emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises((ValueError, TypeError), match=r"(?i)sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_params_rejected(name, dtype):
    t = torch.zeros(4, dtype=dtype)
    with pytest.raises((TypeError, ValueError), match=r"(?i)float"):
        _cls(name)([t])


@pytest.mark.parametrize("name", ALL)
def test_same_tensor_twice_in_one_group(name):
    p = _p(3)
    with pytest.raises(ValueError, match=r"(?i)twice|duplicate|more than once|appear"):
        _cls(name)([p, _p(2), p])


@pytest.mark.parametrize("name", ALL)
def test_same_tensor_in_two_groups(name):
    p = _p(3)
    with pytest.raises(ValueError, match=r"(?i)twice|duplicate|more than once|appear"):
        _cls(name)([dict(params=[p]), dict(params=[_p(2), p])])


def test_same_tensor_twice_via_add_param_group():
    p = _p(3)
    opt = adams_dist.Adams_ZeRO([p])
    with pytest.raises(ValueError, match=r"(?i)twice|duplicate|more than once|appear"):
        opt.add_param_group(dict(params=[p]))


@pytest.mark.parametrize("name", ALL)
def test_params_on_different_devices(name):
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"(?i)device"):
        _cls(name)([a, b])


def test_create_optimizer_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        adams_dist.create_optimizer("adamz", [_p(3)])
    msg = str(exc.value)
    assert "adamz" in msg
    for valid in [r.name for r in TABLE]:
        assert valid in msg.lower().replace("_", "").replace("-", ""), f"{valid} not listed in: {msg}"


@pytest.mark.parametrize("name,cls", [("adams", "Adams_ZeRO"), ("Adam-ATan2", "AdamATan2"), ("ADAMW", "AdamW"),
                                      ("adam_srf", "AdamSRF"), ("HomeAdam", "HomeAdam"),
                                      ("home-adam-ew", "HomeAdamEW")])
def test_create_optimizer_names(name, cls):
    p = _p(3)
    opt = adams_dist.create_optimizer(name, [p], lr=0.02)
    assert isinstance(opt, _cls(cls))
    assert opt.param_groups[0]["lr"] == 0.02


# ------------------------------------------------------------------ lr as a tensor, schedulers
def _run_with_ref(opt, ref, params, steps, seed=0, before_step=None, after_step=None):
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        if before_step:
            before_step(t)
        opt.step()
        ref.step(grads)
        if after_step:
            after_step(t)


def _adams_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in [(5,), (4, 6), (2, 3, 4)]]


def _assert_matches(params, ref, rtol=1e-5, atol=1e-6):
    for i, (p, r) in enumerate(zip(params, ref.params)):
        torch.testing.assert_close(p.detach().double(), r, rtol=rtol, atol=atol, msg=lambda s, i=i: f"param {i}: {s}")


def test_lr_as_one_element_tensor():
    params = _adams_params()
    lr = torch.tensor(0.02)
    opt = adams_dist.Adams_ZeRO(params, lr=lr, weight_decay=0.3)
    ref = Reference("adams", params, lr=float(lr), weight_decay=0.3)
    _run_with_ref(opt, ref, params, 5)
    _assert_matches(params, ref)


def test_lr_tensor_with_more_elements_rejected():
    with pytest.raises(ValueError, match=r"(?i)lr|learning rate|element"):
        adams_dist.Adams_ZeRO([_p(3)], lr=torch.tensor([0.1, 0.2]))


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.6**e),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=8),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["Adams_ZeRO", "AdamW"])
def test_lr_schedulers_change_the_effective_lr(sched, name):
    params = _adams_params()
    opt = _cls(name)([dict(params=params[:1]), dict(params=params[1:], lr=0.03)], lr=0.02)
    ref = Reference(REF_NAME[name], [dict(params=params[:1]), dict(params=params[1:], lr=0.03)], lr=0.02)
    const = Reference(REF_NAME[name], [dict(params=params[:1]), dict(params=params[1:], lr=0.03)], lr=0.02)
    scheduler = SCHEDULERS[sched](opt)
    seen = []

    def copy_hparams(_t):
        for og, rg in zip(opt.param_groups, ref.groups):
            rg["lr"], rg["betas"] = float(og["lr"]), tuple(og["betas"])
        seen.append(float(opt.param_groups[0]["lr"]))

    g = torch.Generator().manual_seed(0)
    for t in range(8):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        copy_hparams(t)
        opt.step()
        ref.step(grads)
        const.step(grads)
        scheduler.step()
    assert len(set(seen)) > 2, f"{sched} did not change lr: {seen}"
    _assert_matches(params, ref)
    diff = max(float((p.detach().double() - c).abs().max()) for p, c in zip(params, const.params))
    assert diff > 1e-3, "the scheduled lr had no effect on the update"


def test_scheduler_with_tensor_lr():
    params = _adams_params()
    opt = adams_dist.Adams_ZeRO(params, lr=torch.tensor(0.02))
    ref = Reference("adams", params, lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def sync(_t):
        ref.groups[0]["lr"] = float(opt.param_groups[0]["lr"])

    _run_with_ref(opt, ref, params, 5, before_step=sync, after_step=lambda t: scheduler.step())
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.02 * 0.5**5, rel=1e-6)
    _assert_matches(params, ref)


# ------------------------------------------------------------------ the Optimizer contract
@pytest.mark.parametrize("name", ALL)
def test_add_param_group_is_stepped(name):
    params = _adams_params()
    opt = _cls(name)(params[:2], lr=0.01)
    ref = Reference(REF_NAME[name], params[:2], lr=0.01)
    _run_with_ref(opt, ref, params[:2], 2, seed=1)
    new = params[2]
    x0 = new.detach().clone()
    opt.add_param_group(dict(params=[new], lr=0.05))
    ref.add_param_group(dict(params=[new], lr=0.05))
    assert opt.param_groups[-1]["lr"] == 0.05
    _run_with_ref(opt, ref, params, 3, seed=2)
    assert float((new.detach() - x0).abs().max()) > 0.02
    _assert_matches(params, ref)


def test_add_param_group_validates_hyperparameters():
    opt = adams_dist.Adams_ZeRO([_p(3)])
    with pytest.raises(ValueError, match=r"(?i)beta"):
        opt.add_param_group(dict(params=[_p(2)], betas=(0.9, 1.0)))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", ALL)
def test_closure_returns_the_loss(name):
    model = nn.Linear(4, 2)
    opt = _cls(name)(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    w0 = model.weight.detach().clone()
    with torch.no_grad():  # step must enable grad for the closure itself
        out = opt.step(closure)
    assert calls and isinstance(out, torch.Tensor)
    assert float(out.detach()) == calls[-1]
    assert not torch.equal(model.weight.detach(), w0)


@pytest.mark.parametrize("name", ALL)
def test_zero_grad(name):
    params = _adams_params()
    opt = _cls(name)(params, lr=0.01)
    ref = Reference(REF_NAME[name], params, lr=0.01)
    _run_with_ref(opt, ref, params, 2)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    opt.step()  # no gradients at all: nothing moves, no step counted, no decay
    ref.step([None] * len(params))
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    _run_with_ref(opt, ref, params, 2, seed=5)
    _assert_matches(params, ref)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in params)


class _Net(nn.Module):
    def __init__(self, seed: int, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter((torch.randn(12, 6, generator=g) / 6**0.5).to(dtype))  # 3 heads of (4, 6)
        adams_dist.set_heads(self.w1, 3)
        self.b1 = nn.Parameter((0.1 * torch.randn(12, generator=g)).to(dtype))
        self.heads = nn.Parameter((torch.randn(2, 6, 6, generator=g) / 6**0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(5, 3, generator=g) / 3).to(dtype).t())  # non-contiguous (3, 5)
        self.gain = nn.Parameter(torch.tensor(1.2).to(dtype))

    def forward(self, x):
        h = torch.tanh(x @ self.w1.t() + self.b1)  # (B, 12)
        h = torch.einsum("bhn,hmn->bhm", h.view(-1, 2, 6), self.heads).reshape(-1, 12)
        return self.gain * (torch.tanh(h)[:, :3] @ self.w2)


def _data(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 5, generator=g).to(dtype)) for _ in range(n)]


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()


def _make(name, model, **kw):
    hp = dict(lr=0.01)
    if name == "Adams_ZeRO":
        hp.update(weight_decay=0.3, scalar_vector_weight_decay=0.1)
    elif name in WITH_TAU:
        hp.update(tau=1e-4)
    hp.update(kw)
    p = list(model.parameters())
    return _cls(name)([dict(params=p[:2]), dict(params=p[2:], lr=0.02)], **hp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_continues_bit_identically(name, dtype):
    data = _data(10, dtype)
    m1 = _Net(0, dtype)
    o1 = _make(name, m1)
    _train(m1, o1, data[:5])
    msd = copy.deepcopy(m1.state_dict())
    osd = copy.deepcopy(o1.state_dict())
    _train(m1, o1, data[5:])

    m2 = _Net(1, dtype)  # different initial weights, different hyperparameters: all must be restored
    m2.load_state_dict(msd)
    o2 = _make(name, m2, lr=0.5)
    o2.load_state_dict(osd)
    assert o2.param_groups[1]["lr"] == 0.02
    _train(m2, o2, data[5:])
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b), f"{n} differs after resuming"


def test_state_dict_survives_torch_save_weights_only():
    data = _data(8)
    m1 = _Net(0)
    o1 = _make("Adams_ZeRO", m1)
    _train(m1, o1, data[:4])
    buf_m, buf_o = io.BytesIO(), io.BytesIO()
    torch.save(m1.state_dict(), buf_m)
    torch.save(o1.state_dict(), buf_o)
    _train(m1, o1, data[4:])
    buf_m.seek(0)
    buf_o.seek(0)
    m2 = _Net(1)
    m2.load_state_dict(torch.load(buf_m, weights_only=True))
    o2 = _make("Adams_ZeRO", m2)
    o2.load_state_dict(torch.load(buf_o, weights_only=True))
    _train(m2, o2, data[4:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_state_dict_is_a_snapshot():
    """state_dict() must not alias live state: training on afterwards leaves the saved copy alone."""
    m = _Net(0)
    o = _make("Adams_ZeRO", m)
    _train(m, o, _data(2))
    sd = o.state_dict()
    frozen = copy.deepcopy(sd)
    _train(m, o, _data(2, seed=1))
    for k, entry in frozen["state"].items():
        for name, t in entry.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(sd["state"][k][name], t), f"state {k}/{name} changed after state_dict()"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["Adams_ZeRO", "HomeAdam", "AdamW"])
def test_deepcopy_model_and_optimizer_continues_identically(name, dtype):
    data = _data(8, dtype)
    m1 = _Net(0, dtype)
    o1 = _make(name, m1)
    _train(m1, o1, data[:3])
    m2, o2 = copy.deepcopy((m1, o1))
    assert all(a is not b for a, b in zip(m1.parameters(), m2.parameters()))
    snapshot = [p.detach().clone() for p in m1.parameters()]
    _train(m2, o2, data[3:])  # training the copy must not touch the original
    assert all(torch.equal(p, s) for p, s in zip(m1.parameters(), snapshot))
    _train(m1, o1, data[3:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(p, s) for p, s in zip(m1.parameters(), snapshot))


def test_deepcopy_optimizer_alone_continues_identically():
    params = _adams_params()
    o1 = adams_dist.Adams_ZeRO(params, lr=0.02, weight_decay=0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        o1.step()
    o2 = copy.deepcopy(o1)
    params2 = [p for grp in o2.param_groups for p in grp["params"]]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(params, params2))
    for _ in range(3):
        for p, q in zip(params, params2):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        o1.step()
        o2.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_no_warnings_in_single_process(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _Net(0)
        opt = _make(name, model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        for x, y in _data(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        opt.state_dict()
        if name == "Adams_ZeRO":
            opt.spectral_sigmas()
