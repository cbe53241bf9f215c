"""Every adams_dist optimizer against the independent float64 reference (tests/reference64.py).

One model covers: 0-D, 1-D, 2-D, (B, M, N), a 2-D weight with set_heads(w, 3), a non-contiguous
parameter, a (1, N) row (not a matrix), a matrix with use_spectral_decay=False, two param groups
with different hyperparameters, and parameters whose grad is None on some steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import adams_dist
from adams_dist import quant8

try:
    from tests.reference64 import Reference
    from tests.rule_table import BY_NAME, TABLE
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference64 import Reference
    from rule_table import BY_NAME, TABLE

RULES = [r.name for r in TABLE]
# Two groups of hyperparameters per rule: the table's "group_a" and "group_b", which differ in every value.
# HomeAdam gradient magnitudes are 2 or 0.05 per element (v_hat = 4 or 0.0025); see _grad_mags


def _hp(rule):
    return BY_NAME[rule].hp["group_a"], BY_NAME[rule].hp["group_b"]


N_STEPS = 8
# (param index, 1-based step) pairs whose grad is None
NONE_GRADS = {(1, 2), (1, 4), (5, 3), (6, 5)}


def _make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    p0 = nn.Parameter(r(()).to(dtype))               # 0-D
    p1 = nn.Parameter(r(6).to(dtype))                # 1-D (grad None on some steps)
    p2 = nn.Parameter(r(4, 6).to(dtype))             # 2-D matrix
    p3 = nn.Parameter(r(1, 6).to(dtype))             # (1, N): vector decay, not spectral
    p4 = nn.Parameter(r(3, 5, 7).to(dtype))          # (B, M, N)
    p5 = nn.Parameter(r(12, 6).to(dtype))            # 2-D with 3 heads -> (3, 4, 6)
    adams_dist.set_heads(p5, 3)
    p6 = nn.Parameter(r(7, 5).to(dtype).t())         # non-contiguous (5, 7)
    p7 = nn.Parameter(r(5, 4).to(dtype))             # matrix opted out of spectral decay
    p7.use_spectral_decay = False
    assert not p6.is_contiguous()
    params = [p0, p1, p2, p3, p4, p5, p6, p7]
    ref_entries = [p0, p1, p2, p3, p4, (p5, {"heads": 3}), p6, (p7, {"spectral": False})]
    return params, ref_entries


SPECTRAL = {2: 1, 4: 3, 5: 3, 6: 1}  # eligible params for Adams -> number of heads
GROUPS = ([0, 1, 2, 3], [4, 5, 6, 7])


def _grad_mags(rule, params, g):
    """Per-element gradient magnitudes.

    For the HomeAdam rules they are fixed per element (2 or 0.05) so v_hat is exactly 4 or 0.0025 and
    every tau decision has a wide margin (and an SRF step, m_hat/4, differs from an SGD step, m_hat);
    params 1, 5, 7 are mixed, the others all 2. In group 0
    only param 1 is mixed, and its grad is None on some steps: the group decision must then ignore it.
    Otherwise None (fresh magnitudes in [0.2, 2] every step).
    """
    if not rule.startswith("homeadam"):
        return None
    mags = []
    for i, p in enumerate(params):
        if i not in (1, 5, 7):
            mags.append(torch.full(p.shape, 2.0))
        else:
            m = torch.where(torch.rand(p.shape, generator=g) < 0.5, 2.0, 0.05)
            m.view(-1)[0] = 0.05  # at least one small element
            mags.append(m)
    return mags


def _grad(p, g, mag):
    sign = torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)
    if mag is None:
        mag = 0.2 + 1.8 * torch.rand(p.shape, generator=g)
    return (sign * mag).to(p.dtype)


def _make_opt(rule, params, **ctor):
    cls = BY_NAME[rule].cls
    h0, h1 = _hp(rule)
    groups = [dict(params=[params[i] for i in GROUPS[0]], **h0),
              dict(params=[params[i] for i in GROUPS[1]], **h1)]
    return cls(groups, **ctor)


def _make_ref(rule, ref_entries, **ctor):
    h0, h1 = _hp(rule)
    groups = [dict(params=[ref_entries[i] for i in GROUPS[0]], **h0),
              dict(params=[ref_entries[i] for i in GROUPS[1]], **h1)]
    return Reference(rule, groups, **ctor)


ORDER = GROUPS[0] + GROUPS[1]  # the reference's flat parameter order


def _run(rule, dtype=torch.float32, seed=0, ctor=None, check_each_step=None):
    ctor = ctor or {}
    params, ref_entries = _make_params(dtype, seed)
    ref = _make_ref(rule, ref_entries, **ctor)
    opt = _make_opt(rule, params, **ctor)
    g = torch.Generator().manual_seed(1000 + seed)
    mags = _grad_mags(rule, params, g)
    for t in range(1, N_STEPS + 1):
        grads = []
        for i, p in enumerate(params):
            gr = _grad(p, g, None if mags is None else mags[i])
            grads.append(None if (i, t) in NONE_GRADS else gr)
        for p, gr in zip(params, grads):
            p.grad = None if gr is None else gr.clone()
        opt.step()
        ref.step([grads[i] for i in ORDER])
        if check_each_step is not None:
            check_each_step(t, params, [ref.params[ORDER.index(i)] for i in range(len(params))])
    ref_params = [ref.params[ORDER.index(i)] for i in range(len(params))]
    return params, opt, ref, ref_params


def _assert_fp32_close(params, ref_params, t=None):
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6,
                                   msg=lambda s, i=i: f"param {i} step {t}: {s}")


@pytest.mark.parametrize("rule", RULES)
def test_rule_matches_reference_fp32(rule):
    initial, _ = _make_params(seed=0)
    initial = [p.detach().clone() for p in initial]
    params, opt, ref, ref_params = _run(rule, check_each_step=lambda t, ps, rs: _assert_fp32_close(ps, rs, t))
    # every parameter moved (the test is not vacuous), shapes/strides kept
    for i, (p, p0) in enumerate(zip(params, initial)):
        assert p.shape == p0.shape
        assert float((p.detach() - p0).abs().max()) > 1e-4, f"param {i} did not move"
    assert params[6].shape == (5, 7) and params[6].stride() == (1, 5), "the non-contiguous param's layout changed"
    # grad-None steps were skipped: step counts per param
    steps = dict(zip(ORDER, ref.steps))
    assert steps[1] == N_STEPS - 2 and steps[5] == N_STEPS - 1 and steps[0] == N_STEPS
    if rule == "homeadam":
        kinds = {d[2] for d in ref.decisions}
        assert kinds == {True, False}, "both HomeAdam branches must be exercised"
        assert min(d[3] for d in ref.decisions) > 1e-2
    if rule == "homeadamew":
        assert ref.ew_margin > 1e-2


@pytest.mark.parametrize("bc_in_atan2", [False, True])
def test_adamatan2_conventions_match_reference(bc_in_atan2):
    params, opt, ref, ref_params = _run("adamatan2", ctor=dict(bias_correction_in_atan2=bc_in_atan2))
    _assert_fp32_close(params, ref_params)


def test_adamatan2_conventions_differ():
    a, _, _, _ = _run("adamatan2", ctor=dict(bias_correction_in_atan2=False))
    b, _, _, _ = _run("adamatan2", ctor=dict(bias_correction_in_atan2=True))
    assert max(float((x - y).detach().abs().max()) for x, y in zip(a, b)) > 1e-3


@pytest.mark.parametrize("per_tensor", [False, True], ids=["group", "per_tensor"])
def test_homeadam_takes_the_srf_step_when_min_v_hat_equals_tau(per_tensor):
    """The switch is ``min(v_hat) >= tau``: at equality HomeAdam takes the SRF step.

    With beta2 = 1/2 and a gradient of magnitude 1/2, v = (1 - 2^-t)/4 and c2 = 1 - 2^-t are exact in
    fp32 and float64, so v_hat = 1/4 = tau exactly at every step; every other element has v_hat = 1."""
    hp = dict(lr=1e-2, betas=(0.9, 0.5), eps=1e-8, tau=0.25, per_tensor=per_tensor)
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    mags = [torch.ones(x.shape) for x in init]
    mags[0][2, 1] = 0.5  # each tensor's (and so the group's) min v_hat is tau
    mags[1][4] = 0.5
    params = [nn.Parameter(x.clone()) for x in init]
    opt = adams_dist.HomeAdam(params, **hp)
    ref = Reference("homeadam", init, **hp)
    sgd = Reference("homeadam", init, **{**hp, "tau": 0.25 * (1 + 1e-9)})  # tau just above: momentum-SGD
    for t in range(1, 6):
        grads = [_grad(p, g, m) for p, m in zip(params, mags)]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        ref.step(grads)
        sgd.step(grads)
        _assert_fp32_close(params, ref.params, t)
    assert ref.decisions and all(adaptive and margin == 0.0 for _, _, adaptive, margin in ref.decisions)
    assert not any(adaptive for _, _, adaptive, _ in sgd.decisions)
    # the two branches really differ here (an SRF step is m_hat / v_hat = 4 m_hat on the small elements)
    assert max(float((p.detach().double() - q).abs().max()) for p, q in zip(params, sgd.params)) > 1e-2


def test_homeadam_per_tensor_matches_reference():
    params, opt, ref, ref_params = _run("homeadam", ctor=dict(per_tensor=True))
    _assert_fp32_close(params, ref_params)
    assert {d[2] for d in ref.decisions} == {True, False}
    # per-tensor and group decisions really differ on this data
    group, _, _, _ = _run("homeadam")
    assert max(float((x - y).detach().abs().max()) for x, y in zip(params, group)) > 1e-4


def test_adams_spectral_sigmas_match_reference():
    params, opt, ref, ref_params = _run("adams")
    _assert_fp32_close(params, ref_params)
    sig = opt.spectral_sigmas()
    got = {id(p): s for p, s in sig.items()}
    assert set(got) == {id(params[i]) for i in SPECTRAL}, "exactly the eligible matrices have sigmas"
    ref_sig = dict(zip(ORDER, ref.sigmas))
    for i, heads in SPECTRAL.items():
        s = got[id(params[i])]
        assert s.numel() == heads
        assert float(ref_sig[i].min()) > 0.1
        torch.testing.assert_close(s.detach().double().reshape(-1), ref_sig[i].reshape(-1), rtol=1e-5, atol=1e-6)


def test_adams_spectral_decay_is_per_head_not_whole_matrix():
    """set_heads changes the numbers: (12, 6) as 3 heads of (4, 6) vs one (12, 6) matrix."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(12, 6, generator=g)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    adams_dist.set_heads(a, 3)
    oa = adams_dist.Adams_ZeRO([a], lr=0.05, weight_decay=1.0)
    ob = adams_dist.Adams_ZeRO([b], lr=0.05, weight_decay=1.0)
    ra = Reference("adams", [(w0, {"heads": 3})], lr=0.05, weight_decay=1.0)
    rb = Reference("adams", [w0], lr=0.05, weight_decay=1.0)
    for _ in range(3):
        gr = torch.randn(12, 6, generator=g)
        a.grad, b.grad = gr.clone(), gr.clone()
        oa.step(), ob.step()
        ra.step([gr]), rb.step([gr])
    torch.testing.assert_close(a.detach().double(), ra.params[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach().double(), rb.params[0], rtol=1e-5, atol=1e-6)
    assert float((ra.params[0] - rb.params[0]).abs().max()) > 1e-3


def test_adams_column_heads_match_the_reference_and_the_linear_layout():
    """set_heads(w, 3, dim=1) on a (6, 3*4) weight (HF Conv1D's (in, out) layout): 3 matrices of (4, 6), the
    transposes of its column blocks. It matches the float64 reference, the same weight stored transposed
    with row heads, and differs from one whole matrix."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(6, 12, generator=g)
    cols, rows, whole = nn.Parameter(w0.clone()), nn.Parameter(w0.t().contiguous()), nn.Parameter(w0.clone())
    adams_dist.set_heads(cols, 3, dim=1)
    adams_dist.set_heads(rows, 3)
    opts = [adams_dist.Adams_ZeRO([p], lr=0.05, weight_decay=1.0) for p in (cols, rows, whole)]
    ref = Reference("adams", [(w0, {"heads": 3, "heads_dim": 1})], lr=0.05, weight_decay=1.0)
    for _ in range(4):
        gr = torch.randn(6, 12, generator=g)
        cols.grad, rows.grad, whole.grad = gr.clone(), gr.t().contiguous(), gr.clone()
        for opt in opts:
            opt.step()
        ref.step([gr])
    torch.testing.assert_close(cols.detach().double(), ref.params[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cols.detach(), rows.detach().t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opts[0].spectral_sigmas()[cols].double(), ref.sigmas[0], rtol=1e-5, atol=1e-6)
    assert float((cols - whole).detach().abs().max()) > 1e-3
    assert opts[0].state_dict()["state"][0]["u"].shape == (12,)  # one entry per row of each head


def test_set_heads_rejects_bad_dims():
    w = nn.Parameter(torch.zeros(6, 9))
    with pytest.raises(ValueError, match="9 columns do not split into 2 heads"):
        adams_dist.set_heads(w, 2, dim=1)
    with pytest.raises(ValueError, match="dim must be 0"):
        adams_dist.set_heads(w, 3, dim=2)
    with pytest.raises(ValueError, match="each head would have 1 column"):
        adams_dist.set_heads(w, 9, dim=1)


@pytest.mark.parametrize("rule", ["adams", "adamw", "homeadam"])
def test_bf16_params_keep_fp32_masters(rule):
    """bf16 params: the update runs on fp32 masters; params are the masters rounded to bf16."""
    bf = torch.bfloat16
    # Compare against the reference run on the exact fp32 masters (which start at the bf16 values).
    params, opt, ref, ref_params = _run(rule, dtype=bf)
    n_diff = n_tot = 0
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert p.dtype == bf, f"param {i} changed dtype"
        want = r.to(bf)
        ulp = (r.abs().clamp_min(1e-30).log2().floor() - 7).exp2()  # one bf16 ulp at r
        err = (p.detach().double() - r).abs()
        assert bool((err <= ulp * 1.0001).all()), f"param {i}: more than one bf16 ulp from the reference"
        n_diff += int((p.detach() != want).sum())
        n_tot += p.numel()
    # rounding an fp32 master within 1e-5 of the reference flips only borderline elements
    assert n_diff <= max(2, n_tot // 50), f"{n_diff}/{n_tot} elements differ from reference rounded to bf16"


def test_bf16_small_updates_accumulate_in_master():
    """lr far below a bf16 ulp: with bf16 masters nothing would ever move."""
    bf = torch.bfloat16
    x0 = torch.full((64,), 1.0, dtype=bf)
    p = nn.Parameter(x0.clone())
    opt = adams_dist.Adams_ZeRO([p], lr=1e-4, weight_decay=0.0, scalar_vector_weight_decay=0.0)
    ref = Reference("adams", [x0], lr=1e-4, weight_decay=0.0, scalar_vector_weight_decay=0.0)
    for _ in range(100):
        gr = torch.ones(64, dtype=bf)
        p.grad = gr.clone()
        opt.step()
        ref.step([gr])
    # reference moved by ~0.01 (a bf16 ulp at 1.0 is 2^-7 = 0.0078)
    assert float(1.0 - ref.params[0][0]) > 0.0078
    assert p.dtype == bf
    torch.testing.assert_close(p.detach().double(), ref.params[0].to(bf).double(), rtol=0, atol=2**-8)
    assert bool((p.detach() < 1.0).all()), "small updates were lost: masters are not fp32"


def test_bf16_params_equal_master_rounded():
    """Where the engine exposes master weights in state_dict, params equal them rounded to bf16."""
    bf = torch.bfloat16
    params, opt, ref, ref_params = _run("adams", dtype=bf)
    masters = _find_masters(opt, params)
    for p, m, r in zip(params, masters, ref_params):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.double().reshape(p.shape), r, rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), m.reshape(p.shape).to(bf))


def _find_masters(opt, params):
    """Locate fp32 master copies of `params` in the optimizer (engine-specific, checked loosely)."""
    getter = getattr(opt, "master_params", None) or getattr(opt, "master_weights", None)
    if callable(getter):
        out = getter()
        if isinstance(out, dict):
            return [out[p] for p in params]
        return list(out)
    sd = opt.state_dict()
    st = sd["state"]
    ids = [pid for g in sd["param_groups"] for pid in g["params"]]
    order = [p for g in opt.param_groups for p in g["params"]]
    by_param = {}
    for p, pid in zip(order, ids):
        s = st.get(pid, {})
        for key in ("master_param", "master", "master_weight", "param_fp32"):
            if key in s:
                by_param[p] = s[key]
                break
    if len(by_param) != len(params):
        pytest.fail(f"could not find fp32 master weights in state_dict keys {sorted(st.get(ids[0], {}))}")
    return [by_param[p] for p in params]


def _check_rank1_decay(W_pre, W_post, refp, lr, wd, b1, b2, sigma, shape):
    """W_post = W_pre - lr/c1*atan2(m, sqrt(v/c2)) - lr*wd*sqrt(M)*(W_pre v) v^T for a unit v, per head.

    The moments come from the reference (they do not depend on the decay); v is recovered from the
    decay itself, so this checks the rank-1 structure and size without fixing how u was chosen.
    """
    c1, c2 = 1 - b1 ** refp.t, 1 - b2 ** refp.t
    atan_step = lr / c1 * torch.atan2(refp.m, torch.sqrt(refp.v / c2))
    D = (W_pre.double() - W_post.double() - atan_step.reshape(W_pre.shape)).reshape(shape)
    Wp = W_pre.double().reshape(shape)
    coef = lr * wd * math.sqrt(shape[-2])
    for h in range(shape[0]):
        _, S, Vh = torch.linalg.svd(D[h])
        assert float(S[1]) <= 1e-4 * float(S[0]) + 1e-5, f"head {h}: decay is not rank one ({S})"
        v = Vh[0]
        wv = Wp[h] @ v
        torch.testing.assert_close(D[h], coef * torch.outer(wv, v), rtol=1e-4, atol=2e-6)
        torch.testing.assert_close(float(sigma[h]), float(wv.norm()), rtol=1e-4, atol=1e-6)
        # a power-iteration estimate never exceeds the spectral norm
        assert float(sigma[h]) <= float(torch.linalg.matrix_norm(Wp[h], ord=2)) * (1 + 1e-5)


@pytest.mark.parametrize("kind", ["zero", "ones_orthogonal"])
def test_collapsed_power_iteration_recovers(kind):
    """Quirk fix: a matrix that is exactly zero for a few steps (or with W^T 1 = 0, so u = ones
    collapses on step 1) still gets spectral decay afterwards: sigma > 0 and a real rank-1 decay."""
    lr, wd, b1, b2 = 0.05, 0.5, 0.9, 0.95
    if kind == "zero":
        w0, b0 = torch.zeros(4, 6), torch.zeros(2, 3, 5)
    else:
        gen = torch.Generator().manual_seed(2)
        w0, b0 = torch.randn(4, 6, generator=gen), torch.randn(2, 3, 5, generator=gen)
        w0 -= w0.mean(0, keepdim=True)  # every column sums to zero: W^T 1 = 0
        b0 -= b0.mean(1, keepdim=True)
        assert float((w0.t() @ torch.ones(4)).abs().max()) < 1e-6
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = adams_dist.Adams_ZeRO([w, b], lr=lr, betas=(b1, b2), weight_decay=wd)
    ref = Reference("adams", [w, b], lr=lr, betas=(b1, b2), weight_decay=wd)
    g = torch.Generator().manual_seed(9)
    for t in range(1, 9):
        if t <= 3 and kind == "zero":  # zero gradients: atan2(0, 0) = 0, the matrices stay exactly zero
            gs = [torch.zeros(4, 6), torch.zeros(2, 3, 5)]
        else:
            gs = [torch.randn(4, 6, generator=g), torch.randn(2, 3, 5, generator=g)]
        pre = [w.detach().clone(), b.detach().clone()]
        w.grad, b.grad = gs[0].clone(), gs[1].clone()
        opt.step()
        ref.step(gs)
        if t <= 3 and kind == "zero":
            assert torch.equal(w.detach(), torch.zeros(4, 6))
            assert torch.equal(b.detach(), torch.zeros(2, 3, 5))
        if t >= 5:
            sig = opt.spectral_sigmas()
            assert float(sig[w].min()) > 0.01 and float(sig[b].min()) > 0.01, f"step {t}: spectral decay is off"
            _check_rank1_decay(pre[0], w.detach(), ref._ps[0], lr, wd, b1, b2, sig[w].reshape(-1), (1, 4, 6))
            _check_rank1_decay(pre[1], b.detach(), ref._ps[1], lr, wd, b1, b2, sig[b].reshape(-1), (2, 3, 5))


def test_spectral_decay_amount_matches_rank1_formula():
    """Zero gradients: one step is exactly W -= lr*wd*sqrt(M)*s*u v^T with u from ones."""
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(5, 3, generator=g).double()
    w = nn.Parameter(W0.float())
    lr, wd = 0.1, 0.3
    opt = adams_dist.Adams_ZeRO([w], lr=lr, weight_decay=wd)
    w.grad = torch.zeros(5, 3)
    opt.step()
    W = W0.float().double()
    u = torch.ones(5, dtype=torch.float64)
    v = W.t() @ u
    v = v / v.norm()
    Wv = W @ v
    u = Wv / Wv.norm()
    s = u @ Wv
    expected = W - lr * wd * math.sqrt(5) * s * torch.outer(u, v)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ master_dtype=float64: tight agreement
@pytest.mark.parametrize("rule", RULES)
def test_float64_masters_match_reference_tightly(rule):
    """With float64 masters the engine computes in float64: its masters must match the float64
    reference far below fp32 rounding (catches small formula slips a 1e-5 tolerance would hide)."""
    params, opt, ref, ref_params = _run(rule, ctor=dict(master_dtype=torch.float64))
    masters = _find_masters(opt, params)
    for i, (p, m, r) in enumerate(zip(params, masters, ref_params)):
        assert m.dtype == torch.float64, f"param {i}: master is {m.dtype}"
        # Adams' W^T u travels in fp32 by design (one fp32 all-reduce), so allow fp32-level error in
        # the (small) spectral decay term only.
        atol = 1e-7 if (rule == "adams" and i in SPECTRAL) else 1e-11
        torch.testing.assert_close(m.reshape(p.shape), r, rtol=0, atol=atol, msg=lambda s, i=i: f"param {i}: {s}")
        torch.testing.assert_close(p.detach(), r.float(), rtol=0, atol=atol + 1e-6)


# ------------------------------------------------------------------ engine options in one process
def _srf_setup(seed=0, **engine):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(6, generator=g), torch.randn(3, 4, generator=g)]
    ps = [nn.Parameter(x.clone()) for x in init]
    opt = adams_dist.AdamSRF(ps, lr=1e-3, eps=1e-8, weight_decay=0.1, **engine)
    ref = Reference("adamsrf", init, lr=1e-3, eps=1e-8, weight_decay=0.1)
    return g, ps, opt, ref


def _clip(grads, max_norm):
    norm = math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads))
    coef = min(1.0, max_norm / (norm + 1e-6))
    return norm, [gr.double() * coef for gr in grads]


def test_max_grad_norm_clips_the_global_norm():
    # AdamSRF steps scale like 1/g, so clipping changes the trajectory a lot
    g, ps, opt, ref = _srf_setup(max_grad_norm=1.0)
    for t in range(5):
        grads = [3.0 * torch.randn(p.shape, generator=g) for p in ps]
        if t == 2:
            grads = [gr * 1e-3 for gr in grads]  # below the threshold: left alone
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()
        norm, clipped = _clip(grads, 1.0)
        ref.step(clipped)
        assert float(opt.last_grad_norm) == pytest.approx(norm, rel=1e-5)
        for p, r in zip(ps, ref.params):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_returns_global_norm_and_clips():
    g, ps, opt, ref = _srf_setup(seed=1)
    for _ in range(4):
        grads = [3.0 * torch.randn(p.shape, generator=g) for p in ps]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        expected = torch.nn.utils.get_total_norm([gr.clone() for gr in grads])
        got = opt.clip_grad_norm_(0.5)
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
        opt.step()
        _, clipped = _clip(grads, 0.5)
        ref.step(clipped)
    for p, r in zip(ps, ref.params):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_nonfinite_skips_the_whole_step(bad):
    g, ps, opt, ref = _srf_setup(seed=2, skip_nonfinite=True)
    for t in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        if t == 2:
            grads[1][1, 2] = bad
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        before = [p.detach().clone() for p in ps]
        opt.step()
        if t == 2:
            assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before)), "a non-finite step moved weights"
            assert opt.skipped_steps == 1
        else:
            ref.step(grads)  # the skipped step never happened: no moments, no step count
    assert opt.skipped_steps == 1
    for p, r in zip(ps, ref.params):
        assert bool(torch.isfinite(p).all())
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ moment_dtype


@pytest.mark.parametrize("rule", RULES)
def test_bf16_moments_match_the_reference_with_moments_stored_in_bf16(rule):
    """float64 masters isolate the moments' rounding: each step computes with the exact moments and stores
    them rounded to bfloat16, as the reference does; rounding must show against unrounded moments."""
    f64 = {"master_dtype": torch.float64}
    params, opt, _, rounded = _run(rule, torch.float64, ctor={**f64, "moment_dtype": torch.bfloat16})
    _, _, _, exact = _run(rule, torch.float64, ctor=f64)
    assert {opt.state[p][k].dtype for p in params for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    for i, (p, r) in enumerate(zip(params, rounded)):
        torch.testing.assert_close(p.detach(), r, rtol=1e-7, atol=1e-8, msg=lambda s, i=i: f"param {i}: {s}")
    assert max(float((r - e).abs().max()) for r, e in zip(rounded, exact)) > 1e-6  # the rounding is visible


@pytest.mark.parametrize("rule", ["adams", "adamatan2", "adamw", "adamsrf", "homeadamew"])  # homeadam: refused
def test_8bit_moments_match_the_reference_with_the_same_quantizer(rule):
    """float64 masters: each step computes with the dequantized moments and stores them quantized, as the
    reference's float64 model of the format does; every param here is one short block. The moments read back
    agree to float64 rounding (one code apart would be ~1e-2 relative). The params: float64 masters differ from
    the reference by up to 5e-8 already with float32 moments (Adams' spectral decay), far below one code's
    effect on a step (~1e-5)."""
    f64 = {"master_dtype": torch.float64}
    params, opt, ref, quantized = _run(rule, torch.float64, ctor={**f64, "moment_dtype": "8bit"})
    _, _, _, exact = _run(rule, torch.float64, ctor=f64)
    assert [opt.state[params[2]][k].dtype for k in ("exp_avg", "exp_avg_sq")] == [torch.int8, torch.uint8]
    for i, p in enumerate(params):
        mine, theirs = opt.state[p], ref._ps[ORDER.index(i)]
        for name, want in (("exp_avg", theirs.m), ("exp_avg_sq", theirs.v)):
            got = quant8.load(mine, name, torch.float64)
            torch.testing.assert_close(got, want.reshape(-1), rtol=1e-12, atol=1e-15,
                                       msg=lambda s, i=i, name=name: f"param {i} {name}: {s}")
    for i, (p, r) in enumerate(zip(params, quantized)):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7, msg=lambda s, i=i: f"param {i}: {s}")
    assert max(float((r - e).abs().max()) for r, e in zip(quantized, exact)) > 1e-5  # the quantization shows


def test_bad_moment_dtypes_are_refused_at_construction():
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="float16 cannot hold"):
        adams_dist.Adams_ZeRO([w], moment_dtype=torch.float16)
    with pytest.raises(ValueError, match="moment_dtype must be one of"):
        adams_dist.AdamW([w], moment_dtype=torch.int8)
    with pytest.raises(ValueError, match="cannot be combined"):
        adams_dist.AdamW([w], moment_dtype=torch.bfloat16, second_moment="row")
    with pytest.raises(ValueError, match="cannot be combined"):
        adams_dist.AdamATan2([w], moment_dtype="8bit", second_moment="row")
    with pytest.raises(ValueError, match="homeadam rule is not element-wise"):
        adams_dist.HomeAdam([w], moment_dtype="8bit")
    with pytest.raises(ValueError, match="moment_dtype must be one of"):
        adams_dist.AdamW([w], moment_dtype="4bit")
