"""second_moment (row / column / tensor) and rotate ablations of AdamATan2 and AdamW.

The reference below is written from the description in docs/api.md, in float64, in the parameter's own
shape (keepdim means over the shared dims) rather than the engine's (rows, cols) view, and draws its
rotation matrices from the documented recipe itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import adams_dist
from adams_dist.testing import run

try:
    from tests.rule_table import BY_NAME, hp_of
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from rule_table import BY_NAME, hp_of

F64 = torch.float64
SHAPES = [(7, 5), (3, 5, 7), (13,), ()]
OPTIONS = {
    "row": dict(second_moment="row"),
    "column": dict(second_moment="column"),
    "tensor": dict(second_moment="tensor"),
    "rotate": dict(rotate=True),
    "rotate+row": dict(second_moment="row", rotate=True, rotation_seed=7),
    "rotate+tensor": dict(second_moment="tensor", rotate=True, rotation_seed=3),
}
# the rules with ablations (the table's "ablation" set), and AdamATan2 configured as adam-atan2-pytorch
RULES = {**hp_of("ablation"), "adamatan2-pytorch": BY_NAME["adamatan2"].hp["pytorch"]}


# ------------------------------------------------------------------------------------- the reference


def reference_rotations(rows: int, cols: int, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented recipe: CPU generator seeded rotation_seed*1_000_003 + index, Gaussian rows x rows then
    cols x cols, Q of QR with its columns multiplied by sign(diag R)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    qs = []
    for n in (rows, cols):
        a = torch.randn(n, n, generator=gen, dtype=F64)
        q, r = torch.linalg.qr(a)
        qs.append(q @ torch.diag(torch.sign(torch.diagonal(r))))
    return qs[0], qs[1]


class Ref:
    """One group of parameters under AdamATan2 / AdamW with the ablation options, all in float64."""

    def __init__(self, rule: str, tensors: list[torch.Tensor], *, lr: float, betas: tuple[float, float],
                 weight_decay: float, eps: float = 1e-8, a: float = 1.0, b: float = 1.0,
                 bias_correction_in_atan2: bool = False, second_moment: str = "element", rotate: bool = False,
                 rotation_seed: int = 0, first_index: int = 0):
        self.rule, self.lr, self.betas, self.wd, self.eps = rule, lr, betas, weight_decay, eps
        self.a, self.b, self.inside = a, b, bias_correction_in_atan2
        self.p = [t.detach().to(F64).clone() for t in tensors]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.mode, self.t = [], 0
        self.rot: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i, p in enumerate(self.p):
            mode = second_moment
            if p.ndim < 2 and mode in ("row", "column"):
                mode = "element"  # no rows or columns: per element
            self.mode.append(mode)
            if rotate and p.ndim >= 2:
                self.rot.append(reference_rotations(math.prod(p.shape[:-1]), p.shape[-1], rotation_seed,
                                                    first_index + i))
            else:
                self.rot.append(None)
        self.v = [self.reduce(p * 0, mode) for p, mode in zip(self.p, self.mode)]

    @staticmethod
    def reduce(sq: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "element":
            return sq
        if mode == "row":  # one value per row: mean over the last dim
            return sq.mean(dim=-1, keepdim=True)
        if mode == "column":  # one value per column: mean over every leading dim
            return sq.mean(dim=tuple(range(sq.ndim - 1)), keepdim=True)
        return sq.mean(dim=tuple(range(sq.ndim)), keepdim=True)  # tensor

    @staticmethod
    def rotate(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, back: bool) -> torch.Tensor:
        mat = x.reshape(-1, x.shape[-1])
        out = left @ mat @ right.T if back else left.T @ mat @ right
        return out.reshape(x.shape)

    def step(self, grads: list[torch.Tensor]) -> None:
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for i, g in enumerate(grads):
            g = g.to(F64)
            rot = self.rot[i]
            if rot is not None:
                g = self.rotate(g, *rot, back=False)
            self.p[i] *= 1 - self.lr * self.wd
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * self.reduce(g * g, self.mode[i])
            m, v = self.m[i], self.v[i]  # v broadcasts against m
            if self.rule == "adamw":
                upd = (m / c1) / (torch.sqrt(v / c2) + self.eps)
            elif self.inside:
                upd = self.a * torch.atan2(m / c1, self.b * torch.sqrt(v / c2))
            else:
                upd = self.a / c1 * torch.atan2(m, self.b * torch.sqrt(v / c2))
            if rot is not None:
                upd = self.rotate(upd, *rot, back=True)
            self.p[i] -= self.lr * upd


def grads_for(step: int, shapes=SHAPES) -> list[torch.Tensor]:
    """Gradients whose scale differs between rows and columns, so that sharing v matters."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen)
        if len(shape) >= 1:
            g = g * torch.linspace(0.2, 3.0, shape[-1])
        if len(shape) >= 2:
            g = g * torch.linspace(0.5, 2.0, shape[-2]).unsqueeze(-1)
        out.append(g)
    return out


def make_params(shapes=SHAPES, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


def build(rule: str, params, **options):
    name = "adamw" if rule == "adamw" else "adamatan2"
    return adams_dist.create_optimizer(name, params, **RULES[rule], **options)


def assert_state_matches(opt, params, ref: Ref) -> None:
    sd = opt.state_dict()["state"]
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().to(F64), ref.p[i], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(sd[i]["exp_avg"].to(F64), ref.m[i], rtol=1e-5, atol=1e-6)
        assert tuple(sd[i]["exp_avg_sq"].shape) == tuple(ref.v[i].shape)
        torch.testing.assert_close(sd[i]["exp_avg_sq"].to(F64), ref.v[i], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("rule", list(RULES))
def test_matches_float64_reference(rule: str, option: str) -> None:
    params = make_params()
    opt = build(rule, params, **OPTIONS[option])
    ref = Ref("adamw" if rule == "adamw" else "atan2", params, **RULES[rule], **OPTIONS[option])
    for step in range(8):
        grads = grads_for(step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        assert_state_matches(opt, params, ref)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_changes_the_trajectory(option: str) -> None:
    """Guards the comparison above against a reference that ignores the options: plain Adam lands elsewhere."""
    params = make_params()
    plain = Ref("adamw", params, **RULES["adamw"])
    ablated = Ref("adamw", params, **RULES["adamw"], **OPTIONS[option])
    for step in range(3):
        plain.step(grads_for(step))
        ablated.step(grads_for(step))
    assert (plain.p[0] - ablated.p[0]).abs().max() > 1e-3
    assert (plain.p[1] - ablated.p[1]).abs().max() > 1e-3


def test_element_keeps_the_usual_path_and_groups_mix() -> None:
    """Default options never enter the ablation path; a group with defaults next to an ablated group steps
    exactly as a plain optimizer would."""
    a, b = make_params(seed=1), make_params(seed=1)
    plain = adams_dist.AdamW(a, **RULES["adamw"])
    extra = [torch.nn.Parameter(torch.randn(6, 4))]
    mixed = adams_dist.AdamW([dict(params=b), dict(params=extra, second_moment="row", rotate=True)],
                             **RULES["adamw"], second_moment="element")
    assert plain._ablated == {} and sorted(mixed._ablated) == [len(b)]
    for step in range(4):
        for p, q, g in zip(a, b, grads_for(step)):
            p.grad, q.grad = g.clone(), g.clone()
        extra[0].grad = torch.randn(6, 4)
        plain.step()
        mixed.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("rule", ["adamatan2", "adamw"])
def test_state_memory_shrinks(rule: str) -> None:
    shape, rows, cols = (4, 16, 32), 64, 32

    def state(**options):
        p = torch.nn.Parameter(torch.randn(shape))
        opt = build(rule, [p], **options)
        return opt.state_bytes(), opt.state_dict()["state"][0]

    full, _ = state()
    assert full == 2 * rows * cols * 4  # m and v; the fp32 master aliases the parameter
    expected = {"row": (rows, (4, 16, 1)), "column": (cols, (1, 1, cols)), "tensor": (1, (1, 1, 1))}
    for mode, (v_numel, v_shape) in expected.items():
        nbytes, st = state(second_moment=mode)
        assert nbytes == (rows * cols + v_numel) * 4, mode
        assert tuple(st["exp_avg_sq"].shape) == v_shape
        assert tuple(st["exp_avg"].shape) == shape
    nbytes, st = state(second_moment="row", rotate=True)
    assert nbytes == (rows * cols + rows + rows * rows + cols * cols) * 4
    # fewer than 2 dims: row/column stay per element (the usual path), tensor keeps one value
    for vec_shape in [(13,), ()]:
        for mode, v_shape in [("row", vec_shape), ("column", vec_shape), ("tensor", (1,) * len(vec_shape))]:
            p = torch.nn.Parameter(torch.randn(vec_shape))
            opt = build(rule, [p], second_moment=mode, rotate=True)
            st = opt.state_dict()["state"][0]
            assert tuple(st["exp_avg_sq"].shape) == v_shape
            assert "rotation_left" not in st  # vectors are not rotated


def test_rotations_are_orthogonal_fixed_and_seeded() -> None:
    params = make_params()
    opt = adams_dist.AdamATan2(params, rotate=True, rotation_seed=5)
    initial = {i: (opt.state[p]["rotation_left"].clone(), opt.state[p]["rotation_right"].clone())
               for i, p in enumerate(params) if p.ndim >= 2}
    assert sorted(initial) == [0, 1]
    for i, (left, right) in initial.items():
        rows, cols = math.prod(params[i].shape[:-1]), params[i].shape[-1]
        assert left.shape == (rows, rows) and right.shape == (cols, cols)
        for q in (left, right):
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), atol=1e-5, rtol=0)
            torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0]), atol=1e-5, rtol=0)
        ref_left, ref_right = reference_rotations(rows, cols, 5, i)
        torch.testing.assert_close(left.to(F64), ref_left, atol=1e-6, rtol=0)
        torch.testing.assert_close(right.to(F64), ref_right, atol=1e-6, rtol=0)
    twins = adams_dist.AdamATan2(make_params([(7, 5), (7, 5)]), rotate=True, rotation_seed=5)
    lefts = [twins.state[p]["rotation_left"] for p in twins.param_groups[0]["params"]]
    assert torch.equal(lefts[0], initial[0][0]) and not torch.allclose(lefts[0], lefts[1])  # one draw per parameter
    for step in range(3):
        for p, g in zip(params, grads_for(step)):
            p.grad = g
        opt.step()
    for i, (left, right) in initial.items():
        assert torch.equal(opt.state[params[i]]["rotation_left"], left)
        assert torch.equal(opt.state[params[i]]["rotation_right"], right)
    other = adams_dist.AdamATan2(make_params(), rotate=True, rotation_seed=6)
    assert not torch.allclose(other.state[other.param_groups[0]["params"][0]]["rotation_left"], initial[0][0])
    same = adams_dist.AdamATan2(make_params(), rotate=True, rotation_seed=5)
    assert torch.equal(same.state[same.param_groups[0]["params"][0]]["rotation_left"], initial[0][0])


def _run(opt, params, steps) -> None:
    for step in steps:
        for p, g in zip(params, grads_for(step)):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("option", ["row", "tensor", "rotate+row"])
def test_state_dict_round_trip_and_deepcopy(option: str) -> None:
    params = make_params()
    opt = build("adamw", params, **OPTIONS[option])
    _run(opt, params, range(3))
    sd = opt.state_dict()
    twin_params = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    twin = build("adamw", twin_params, **OPTIONS[option])
    twin.load_state_dict(copy.deepcopy(sd))
    copied_params, copied = copy.deepcopy((params, opt))
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    _run(opt, params, range(3, 6))
    _run(twin, twin_params, range(3, 6))
    _run(copied, copied_params, range(3, 6))
    for p, q, r in zip(params, twin_params, copied_params):
        assert torch.equal(p, q) and torch.equal(p, r)
    for name in sd["state"][1]:
        assert torch.equal(twin.state_dict()["state"][1][name], opt.state_dict()["state"][1][name]), name


def test_checkpoint_round_trip(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = adams_dist.AdamATan2(model.parameters(), second_moment="column", rotate=True)
    x = torch.randn(4, 6)
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    adams_dist.save_checkpoint(tmp_path / "ckpt.pt", model, opt, step=2)
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    opt2 = adams_dist.AdamATan2(model2.parameters(), second_moment="column", rotate=True)
    assert adams_dist.load_checkpoint(tmp_path / "ckpt.pt", model2, opt2)["step"] == 2
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    plain = adams_dist.AdamATan2(model2.parameters())
    with pytest.raises(adams_dist.CheckpointError, match="second_moment"):
        adams_dist.load_checkpoint(tmp_path / "ckpt.pt", model2, plain)


def test_load_state_dict_rejects_other_options_and_shapes() -> None:
    params = make_params()
    opt = adams_dist.AdamW(params, second_moment="row")
    _run(opt, params, range(1))
    sd = opt.state_dict()
    for options in [dict(), dict(second_moment="column"), dict(second_moment="row", rotate=True)]:
        other = adams_dist.AdamW(make_params(), **options)
        with pytest.raises(ValueError, match="second_moment"):
            other.load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg_sq"] = torch.zeros(7, 5)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        adams_dist.AdamW(make_params(), second_moment="row").load_state_dict(bad)
    rotated = adams_dist.AdamW(make_params(), rotate=True, rotation_seed=1)
    bad = copy.deepcopy(rotated.state_dict())
    del bad["state"][1]["rotation_right"]
    with pytest.raises(ValueError, match="rotation_right"):
        adams_dist.AdamW(make_params(), rotate=True, rotation_seed=1).load_state_dict(bad)
    with pytest.raises(ValueError, match="rotation_seed"):
        adams_dist.AdamW(make_params(), rotate=True, rotation_seed=2).load_state_dict(rotated.state_dict())


@pytest.mark.parametrize("name", ["adamatan2", "adamw"])
@pytest.mark.parametrize("kw, match", [
    (dict(second_moment="rows"), "second_moment"),
    (dict(second_moment=None), "second_moment"),
    (dict(rotate="yes"), "rotate"),
    (dict(rotate=1), "rotate"),
    (dict(rotation_seed=-1), "rotation_seed"),
    (dict(rotation_seed=1.5), "rotation_seed"),
    (dict(rotation_seed=True), "rotation_seed"),
    (dict(rotation_seed=2**40), "rotation_seed"),
])
def test_bad_values_rejected(name: str, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        adams_dist.create_optimizer(name, make_params(), **kw)
    opt = adams_dist.create_optimizer(name, make_params())
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(3))], **kw))


def test_other_optimizers_refuse_the_options() -> None:
    with pytest.raises(TypeError, match="second_moment"):
        adams_dist.create_optimizer("adams", make_params(), second_moment="row")
    with pytest.raises(ValueError, match="AdamATan2 and AdamW only"):
        adams_dist.AdamSRF([dict(params=make_params(), rotate=True)])


def test_changing_options_after_construction_raises() -> None:
    params = make_params()
    opt = adams_dist.AdamW(params)
    opt.param_groups[0]["second_moment"] = "row"
    _grads = grads_for(0)
    for p, g in zip(params, _grads):
        p.grad = g
    with pytest.raises(ValueError, match="after the optimizer was built"):
        opt.step()


def distributed_refusal_worker(rank: int, world: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    messages = []
    adams_dist.AdamW(make_params())  # the defaults shard as usual
    for options in (dict(second_moment="row"), dict(rotate=True)):
        try:
            adams_dist.AdamATan2(make_params(), **options)
        except NotImplementedError as err:
            messages.append(str(err))
    mesh = init_device_mesh("cpu", (world,))
    dparams = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))]
    try:
        adams_dist.AdamW(dparams, second_moment="tensor")
    except NotImplementedError as err:
        messages.append(str(err))
    return messages


def test_distributed_modes_refuse_the_options() -> None:
    for messages in run(distributed_refusal_worker, 2, timeout=180):
        assert len(messages) == 3
        assert all("one process only" in m for m in messages)
        assert "ZeRO" in messages[0] and "ZeRO" in messages[1] and "DTensor" in messages[2]
