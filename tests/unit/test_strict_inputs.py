"""Inputs are refused by name before anything changes: hyperparameters that are not finite real numbers,
positional calls that a peer package reads another way, state dicts of another optimizer, and malformed
checkpoints (which must leave the model and the optimizer bit-identical)."""

from __future__ import annotations

import copy
import inspect
import math
import re

import pytest
import torch
from torch import nn

import adams_dist
from adams_dist import checkpoint
from adams_dist.checkpoint_files import atomic_save, checksum

# ------------------------------------------------------------------ hyperparameters

INF, NAN = float("inf"), float("nan")
BAD_VALUES = [
    ("AdamW", "lr", INF), ("AdamW", "lr", True), ("Adams_ZeRO", "lr", torch.tensor(INF)), ("AdamW", "lr", "1e-3"),
    ("AdamW", "betas", (False, 0.9)), ("AdamW", "betas", (0.9, torch.tensor(NAN))),
    ("AdamW", "eps", INF), ("AdamSRF", "eps", NAN), ("AdamW", "weight_decay", INF), ("HomeAdam", "weight_decay", True),
    ("Adams_ZeRO", "scalar_vector_weight_decay", INF), ("Adams_ZeRO", "scalar_vector_weight_decay", False),
    ("AdamATan2", "a", INF), ("AdamATan2", "b", INF), ("HomeAdam", "tau", INF), ("HomeAdamEW", "tau", INF),
    ("AdamATan2", "bias_correction_in_atan2", "yes"), ("HomeAdam", "per_tensor", 1),
]


@pytest.mark.parametrize("name,key,value", BAD_VALUES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_hyperparameters_must_be_finite_real_numbers(name, key, value):
    named = value  # what the message must show: the value, or the offending beta
    if key == "betas":
        named = next(v for v in value if isinstance(v, bool) or not math.isfinite(float(v)))
    with pytest.raises(ValueError, match=re.escape(repr(named))):
        getattr(adams_dist, name)([nn.Parameter(torch.ones(3))], **{key: value})


def test_one_element_tensor_lr_is_still_allowed():
    opt = adams_dist.AdamW([nn.Parameter(torch.ones(3))], lr=torch.tensor(0.01))
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)


# ------------------------------------------------------------------ positional arguments

@pytest.mark.parametrize("args", [(1e-3,), (torch.float32, 1e-3)], ids=["master_dtype", "process_group"])
def test_adams_lr_in_place_of_master_dtype_says_pass_lr(args):
    with pytest.raises(TypeError, match=r"looks like a learning rate: pass it as lr=0\.001"):
        adams_dist.Adams_ZeRO([nn.Parameter(torch.ones(3))], *args)


def _names(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]


def _peers() -> list[tuple[str, str, list[str]]]:
    """(our class, peer, the peer's positional parameter names); the installed peers are read, not copied."""
    from adam_atan2_pytorch import AdamAtan2
    from adams import Adams_ZeRO

    homeadam = ["params", "lr", "betas", "eps", "weight_decay", "tau"]  # the homeadam package's order
    return [
        ("Adams_ZeRO", "adams-torch", _names(Adams_ZeRO.__init__)),
        ("AdamW", "torch.optim.AdamW", _names(torch.optim.AdamW.__init__)),
        ("AdamATan2", "adam-atan2-pytorch", _names(AdamAtan2.__init__)),
        ("AdamATan2", "adam-atan2", ["params", "lr", "betas", "weight_decay"]),
        ("AdamSRF", "homeadam", homeadam[:5]),
        ("HomeAdam", "homeadam", homeadam),
        ("HomeAdamEW", "homeadam", homeadam),
    ]


VALUES = dict(master_dtype=torch.float64, process_group=None, lr=0.0123, betas=(0.81, 0.97), eps=1e-5,
              weight_decay=0.07, scalar_vector_weight_decay=0.05, tau=0.3, a=1.3, b=0.9, amsgrad=False,
              regen_reg_rate=0.0, decoupled_wd=False, cautious_wd=False, cautious_factor=1.0)


@pytest.mark.parametrize("ours,peer,names", _peers(), ids=lambda v: v if isinstance(v, str) else "")
def test_positional_calls_of_peer_packages_mean_the_same_or_fail(ours, peer, names):
    """Every positional call that works in the peer either means the same here or raises TypeError."""
    cls = getattr(adams_dist, ours)
    mine = set(inspect.signature(cls.__init__).parameters)
    for n in range(2, len(names) + 1):
        prefix = names[1:n]
        args = [VALUES[k] for k in prefix]
        if not set(prefix) <= mine:
            with pytest.raises(TypeError):
                cls([nn.Parameter(torch.ones(3))], *args)
            continue
        opt = cls([nn.Parameter(torch.ones(3))], *args)
        got = {k: opt.master_dtype if k == "master_dtype" else opt.param_groups[0][k]
               for k in prefix if k != "process_group"}
        assert got == {k: VALUES[k] for k in got}, f"{ours}{tuple(args)} read like {peer}: {got}"


# ------------------------------------------------------------------ state dicts of another optimizer

def _trained(name: str, seed: int = 0, **hp):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = getattr(adams_dist, name)(model.parameters(), lr=1e-2, **hp)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _legacy(sd):
    """A state dict as this package wrote it before it recorded the class and the rule."""
    return {k: v for k, v in sd.items() if k in ("state", "param_groups")}


PAIRS = [("Adams_ZeRO", "AdamW"), ("HomeAdam", "AdamW"), ("AdamW", "AdamSRF"), ("HomeAdamEW", "AdamSRF"),
         ("HomeAdam", "HomeAdamEW"), ("AdamATan2", "Adams_ZeRO"), ("AdamSRF", "HomeAdamEW")]


@pytest.mark.parametrize("legacy", [False, True], ids=["recorded", "older"])
@pytest.mark.parametrize("src,dst", PAIRS)
def test_state_dict_of_another_optimizer_is_refused(src, dst, legacy):
    sd = _trained(src)[1].state_dict()
    if not legacy:
        assert (sd["optimizer_class"], sd["rule"]) == (src, getattr(adams_dist, src).rule.name)
    _, opt = _trained(dst, seed=1)
    before = copy.deepcopy(opt.state_dict())
    pattern = "saved by another optimizer" if legacy else f"saved by {src} .*this optimizer is {dst}"
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(_legacy(sd) if legacy else sd)
    _assert_same(opt.state_dict(), before)


@pytest.mark.parametrize("name", ["Adams_ZeRO", "AdamATan2", "AdamW", "AdamSRF", "HomeAdam", "HomeAdamEW"])
def test_older_state_dict_of_the_same_optimizer_still_loads(name):
    model, opt = _trained(name)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10)  # adds max_lr etc. to the groups
    sd = _legacy(copy.deepcopy(opt.state_dict()))
    model2, opt2 = _trained(name, seed=1)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    _assert_same(opt2.state_dict()["state"], opt.state_dict()["state"])


def test_state_dict_from_before_the_ablation_options_still_loads():
    model, opt = _trained("AdamW")
    sd = _legacy(copy.deepcopy(opt.state_dict()))
    for group in sd["param_groups"]:
        for key in ("second_moment", "rotate", "rotation_seed"):
            del group[key]
    _, opt2 = _trained("AdamW", seed=1)
    opt2.load_state_dict(sd)
    _assert_same(opt2.state_dict()["state"], opt.state_dict()["state"])


# ------------------------------------------------------------------ malformed checkpoints

def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


class _Scaled(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.gain = nn.Parameter(torch.tensor(1.5))  # a 0-d entry: its shape alone cannot tell a string from it
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.gain * self.lin(x)


def _corrupt(osd, model_sd, how):
    state, group = osd["state"], osd["param_groups"][0]
    if how == "lr-string":
        group["lr"] = "abc"
    elif how == "weight-decay-inf":
        group["weight_decay"] = INF
    elif how == "step-string":
        state[1]["step"] = "abc"
    elif how == "state-list":
        state[1]["exp_avg"] = state[1]["exp_avg"].tolist()
    elif how == "state-int":
        state[2]["exp_avg_sq"] = state[2]["exp_avg_sq"].long()
    elif how == "model-string":
        model_sd["gain"] = "abc"


@pytest.mark.parametrize("how", ["lr-string", "weight-decay-inf", "step-string", "state-list", "state-int",
                                 "model-string"])
def test_malformed_checkpoint_changes_nothing(tmp_path, how):
    model = _Scaled(0)
    opt = adams_dist.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    osd, model_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _corrupt(osd, model_sd, how)
    payload = checkpoint._payload(model, opt, osd, {}, 1)  # the checkpoint's own payload: valid checksums
    payload["model"] = model_sd
    payload["metadata"]["checksums"]["model"] = checksum(model_sd)
    atomic_save(payload, str(tmp_path / "bad.pt"))

    model2 = _Scaled(1)
    opt2 = adams_dist.AdamW(model2.parameters(), lr=3e-2)
    before = copy.deepcopy((model2.state_dict(), opt2.state_dict()))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(tmp_path / "bad.pt", model2, opt2)
    _assert_same((model2.state_dict(), opt2.state_dict()), before)
