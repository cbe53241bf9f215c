"""Checkpoints: exact resume, world-size changes, errors before any change, atomic saves, DCP interplay.

Starting processes is the slow part, so one spawn of 4 processes (test_distributed_resume_and_world_size_changes)
serves every multi-process check, on process groups of 2, 3 and 4 of them; everything else runs in this process
(the crash test forks savers from one helper process).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rule_table import hp_of
from torch import nn

import adams_dist
from adams_dist.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from adams_dist.testing import run

RULES = hp_of("dist")  # rule name -> the multi-process tests' hyperparameters

K, J = 4, 4  # steps before and after the checkpoint
GLOBAL_BATCH = 12  # divisible by every world size used here, so the averaged gradient is the same


class Net(nn.Module):
    """Linear -> 2-head batched matrix -> Linear, with a persistent buffer."""

    def __init__(self, seed: int = 0, hidden: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(6, hidden)
        self.mix = nn.Parameter(torch.randn(2, hidden // 2, hidden // 2) * 0.3)  # (heads, M, N)
        self.out = nn.Linear(hidden, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.tanh(self.inp(x))
        h = torch.einsum("bhi,hij->bhj", h.view(x.shape[0], 2, -1), self.mix).reshape(x.shape[0], -1)
        return self.out(torch.tanh(h))


def make(rule: str = "adams", seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 16,
         order: str = "normal", group: Any = None, heads: int | None = None) -> tuple[Net, Any, Any]:
    model = Net(seed, hidden).to(dtype)
    if heads is not None:
        adams_dist.set_heads(model.inp.weight, heads)
    adams_dist.set_heads(model.out.weight, 2, dim=1)  # (3, 16): 2 heads of (8, 3), its column blocks; u replicated
    matrices = [model.inp.weight, model.mix, model.out.weight]
    if order == "swapped":
        matrices = [model.inp.weight, model.out.weight, model.mix]
    groups = [{"params": matrices}, {"params": [model.inp.bias, model.out.bias], "lr": 1e-2}]
    opt = adams_dist.create_optimizer(rule, groups, **RULES[rule], bucket_mb=1e-3, process_group=group)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=K + J + 3)
    return model, opt, sched


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)
    n = GLOBAL_BATCH // world
    return x[rank * n: (rank + 1) * n], y[rank * n: (rank + 1) * n]


def train(model: Net, opt: Any, sched: Any, start: int, steps: int, rank: int = 0, world: int = 1) -> None:
    dtype = next(model.parameters()).dtype
    for step in range(start, start + steps):
        x, y = batch(step, rank, world)
        (model(x.to(dtype)).float() - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def state_of(opt: Any) -> dict[str, Any]:
    return opt.state_dict()


def assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested state (tensors with torch.equal, tuples stay tuples)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_equal_lists(got: list[torch.Tensor], want: list[torch.Tensor], exact: bool, what: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if exact:
            assert torch.equal(g, w), f"{what}: tensor {i} differs by {(g.float() - w.float()).abs().max():.3g}"
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"{what}: tensor {i}: {m}")


# ------------------------------------------------------------------------------------------------ single process


@pytest.mark.parametrize("rule", list(RULES))
def test_resume_is_exact_single_process(tmp_path: Path, rule: str) -> None:
    path = tmp_path / "ckpt.pt"
    model, opt, sched = make(rule)
    train(model, opt, sched, 0, K)
    save_checkpoint(path, model, opt, scheduler=sched.state_dict(), step=K)
    train(model, opt, sched, K, J)

    model2, opt2, sched2 = make(rule, seed=123)  # different init: the checkpoint must overwrite everything
    extra = load_checkpoint(path, model2, opt2)
    sched2.load_state_dict(extra["scheduler"])
    assert extra["step"] == K
    train(model2, opt2, sched2, extra["step"], J)

    assert_equal_lists(params_of(model2), params_of(model), exact=True, what=rule)
    assert_same_tree(state_of(opt2), state_of(opt))
    assert sched2.state_dict() == sched.state_dict()
    if rule == "adams":
        for s2, s in zip(opt2.spectral_sigmas().values(), opt.spectral_sigmas().values()):
            assert torch.equal(s2, s)


def test_resume_is_exact_with_bf16_model(tmp_path: Path) -> None:
    """The fp32 master weights come from the checkpoint, not from the (rounded) bf16 model."""
    path = tmp_path / "ckpt.pt"
    model, opt, sched = make(dtype=torch.bfloat16)
    train(model, opt, sched, 0, K)
    save_checkpoint(path, model, opt, scheduler=sched.state_dict())
    train(model, opt, sched, K, J)

    model2, opt2, sched2 = make(dtype=torch.bfloat16, seed=5)
    sched2.load_state_dict(load_checkpoint(path, model2, opt2)["scheduler"])
    masters = [opt2.state[p]["master_param"] for p in model2.parameters()]
    assert all(m.dtype == torch.float32 for m in masters)
    assert any(not torch.equal(m, p.detach().float().reshape(-1)) for m, p in zip(masters, model2.parameters()))
    train(model2, opt2, sched2, K, J)
    assert_equal_lists(params_of(model2), params_of(model), exact=True, what="bf16")
    assert_same_tree(state_of(opt2), state_of(opt))


def test_scheduler_and_hyperparameters_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    model, opt, sched = make()
    train(model, opt, sched, 0, 3)
    opt.param_groups[1]["weight_decay"] = 0.25  # edited by hand mid-run: must survive the restart
    save_checkpoint(path, model, opt, scheduler=sched.state_dict(), epoch=2, note="warm")

    model2, opt2, sched2 = make()
    extra = load_checkpoint(path, model2, opt2)
    sched2.load_state_dict(extra["scheduler"])
    assert extra == {"scheduler": sched.state_dict(), "epoch": 2, "note": "warm"}
    assert sched2.state_dict() == sched.state_dict()
    assert sched2.get_last_lr() == sched.get_last_lr()
    for g2, g in zip(opt2.param_groups, opt.param_groups):
        assert {k: v for k, v in g2.items() if k != "params"} == {k: v for k, v in g.items() if k != "params"}
        assert isinstance(g2["betas"], tuple)  # tuples survive weights_only loading as tuples
    assert opt2.param_groups[1]["weight_decay"] == 0.25
    sched.step()
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_fresh_optimizer_state_is_eager(tmp_path: Path) -> None:
    """State exists at construction: saving (or DCP's state-dict API) before any step changes nothing."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt, sched = make()
    before = params_of(model)
    assert all(p in opt.state and "step" in opt.state[p] for p in model.parameters())
    osd = get_optimizer_state_dict(model, opt)  # calls a zero-grad, lr=0 step() when optimizer.state is empty
    assert all(float(e["step"]) == 0 for e in osd["state"].values())
    save_checkpoint(tmp_path / "c.pt", model, opt, scheduler=sched.state_dict())
    assert_equal_lists(params_of(model), before, exact=True, what="params after save")
    for p in model.parameters():
        st = opt.state[p]
        assert float(st["step"]) == 0
        assert all(not st[n].any() for n in ("exp_avg", "exp_avg_sq"))
        if "u" in st:
            assert torch.equal(st["u"], torch.ones_like(st["u"]))
    assert all(p.grad is None for p in model.parameters())

    model2, opt2, sched2 = make(seed=9)
    sched2.load_state_dict(load_checkpoint(tmp_path / "c.pt", model2, opt2)["scheduler"])
    train(model, opt, sched, 0, K)
    train(model2, opt2, sched2, 0, K)
    assert_equal_lists(params_of(model2), params_of(model), exact=True, what="resume from step 0")


def test_dcp_state_dict_api_single_process(tmp_path: Path) -> None:
    """get_optimizer_state_dict works (FQN keys, full shapes); set_optimizer_state_dict: see docs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt, sched = make()
    train(model, opt, sched, 0, K)
    osd = get_optimizer_state_dict(model, opt)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(osd["state"]) == sorted(names)
    for name, p in model.named_parameters():
        assert osd["state"][name]["exp_avg"].shape == p.shape
        assert float(osd["state"][name]["step"]) == K
    assert [g["params"] for g in osd["param_groups"]] == [["inp.weight", "mix", "out.weight"],
                                                          ["inp.bias", "out.bias"]]

    dcp.save({"optim": osd}, checkpoint_id=str(tmp_path / "dcp"))  # no process group needed
    model2, opt2, _ = make(seed=3)
    loaded = {"optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"))
    assert_same_tree(loaded["optim"]["state"], osd["state"])

    model2.load_state_dict(model.state_dict())
    set_optimizer_state_dict(model2, opt2, loaded["optim"])
    assert_same_tree(state_of(opt2), state_of(opt))


# ------------------------------------------------------------------------------------------------ errors


def snapshot(model: nn.Module, opt: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return params_of(model), state_of(opt)


def assert_unchanged(model: nn.Module, opt: Any, snap: tuple[list[torch.Tensor], dict[str, Any]]) -> None:
    assert_equal_lists(params_of(model), snap[0], exact=True, what="model after a failed load")
    assert_same_tree(state_of(opt), snap[1], "optimizer after a failed load")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, opt, sched = make()
    train(model, opt, sched, 0, 2)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, scheduler=sched.state_dict())
    return path


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    model, opt, _ = make(seed=4)
    snap = snapshot(model, opt)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt", model, opt)
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped-byte", "garbage", "directory"])
def test_damaged_file_raises_before_any_change(saved: Path, damage: str) -> None:
    data = saved.read_bytes()
    if damage == "truncated":
        saved.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "empty":
        saved.write_bytes(b"")
    elif damage == "flipped-byte":  # one bit inside the largest tensor's data: only the checksums can tell
        with zipfile.ZipFile(saved) as z:
            info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        raw = bytearray(data)
        header = info.header_offset
        name_len, extra_len = int.from_bytes(raw[header + 26: header + 28], "little"), int.from_bytes(
            raw[header + 28: header + 30], "little")
        raw[header + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
        saved.write_bytes(bytes(raw))
    elif damage == "garbage":
        saved.write_bytes(os.urandom(len(data)))
    else:
        saved.unlink()
        saved.mkdir()
    model, opt, _ = make(seed=4)
    snap = snapshot(model, opt)
    with pytest.raises(CheckpointError, match="corrupt|directory") as info:
        load_checkpoint(saved, model, opt)
    assert isinstance(info.value, ValueError)
    assert_unchanged(model, opt, snap)


def test_not_an_adams_dist_checkpoint(tmp_path: Path) -> None:
    model, opt, _ = make()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    snap = snapshot(model, opt)
    with pytest.raises(CheckpointError, match="not an adams_dist checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", model, opt)
    assert_unchanged(model, opt, snap)


class _RunsCode:
    """Unpickling this creates a directory: proof that code from the file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.marker,))


def test_loading_never_runs_code_from_the_file(saved: Path, tmp_path: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    marker = tmp_path / "code-ran"
    payload["extra"]["evil"] = _RunsCode(str(marker))
    torch.save(payload, saved)
    model, opt, _ = make(seed=4)
    snap = snapshot(model, opt)
    with pytest.raises(CheckpointError, match="run code"):
        load_checkpoint(saved, model, opt)
    assert not marker.exists()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("mismatch", ["shape", "names", "buffer", "optimizer-class", "param-order", "heads",
                                      "missing-state"])
def test_checkpoint_for_another_model_or_optimizer(saved: Path, mismatch: str) -> None:
    if mismatch == "shape":
        model, opt, _ = make(hidden=8)
        pattern = r"different model: .*parameter 'inp.weight' has shape \(16, 6\) in the checkpoint but \(8, 6\)"
    elif mismatch == "names":
        model, opt, _ = make()
        model.extra = nn.Linear(2, 2)  # registered after the optimizer: names differ, optimizer does not
        pattern = r"different model: parameters in the checkpoint but not in the model|missing from the checkpoint"
    elif mismatch == "buffer":
        model, opt, _ = make()
        model.register_buffer("scale", torch.ones(3))
        pattern = r"state-dict entries missing from the checkpoint: 'scale'"
    elif mismatch == "optimizer-class":
        model, opt, _ = make("adamw")
        pattern = "holds Adams_ZeRO state; this optimizer is a AdamW"
    elif mismatch == "param-order":
        model, opt, _ = make(order="swapped")
        pattern = "optimizer parameter #1 is 'out.weight' here but was 'mix'"
    elif mismatch == "heads":  # same shapes, but set_heads changes the spectral layout (and sigma's shape)
        model, opt, _ = make(heads=2)
        pattern = r"#0 \('inp.weight'\) had spectral decay on 1 head of 16 x 6 .* 2 heads of 8 x 6 here"
    else:  # same class and params, but the state lacks a moment: the engine's own validation speaks
        model, opt, _ = make()
        payload = torch.load(saved, weights_only=True)
        del payload["optimizer"]["state"][0]["exp_avg"]
        from adams_dist.checkpoint_files import checksum as _checksum

        payload["metadata"]["checksums"]["optimizer"] = _checksum(payload["optimizer"])
        torch.save(payload, saved)
        pattern = "optimizer state does not fit this optimizer: .*lacks 'exp_avg'"
    snap = snapshot(model, opt)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(saved, model, opt)
    assert_unchanged(model, opt, snap)


def test_extras_must_load_without_code(saved: Path) -> None:
    """Unsupported extras raise TypeError naming them; nothing is written; supported ones round-trip."""
    import numpy as np

    before = saved.read_bytes()
    model, opt, _ = make()
    bad: dict[str, Any] = {"fn": lambda s: s, "np": np.float64(1.0), "obj": {"inner": [1, object()]},
                           "frozen": frozenset([1])}
    where = {"fn": r"extra\['fn'\]", "np": r"extra\['np'\]", "obj": r"extra\['obj'\]\['inner'\]\[1\]",
             "frozen": r"extra\['frozen'\]"}
    for key, value in bad.items():
        with pytest.raises(TypeError, match=where[key]):
            save_checkpoint(saved, model, opt, **{key: value})
    assert saved.read_bytes() == before
    assert sorted(os.listdir(saved.parent)) == [saved.name]

    good = {"t": (1, (2.5, "x")), "s": {1, 2}, "b": b"\x00", "n": None, "c": 1 + 2j, "dt": torch.bfloat16,
            "dev": torch.device("cpu"), "size": torch.Size([2, 3]), "od": collections.OrderedDict(a=1),
            "bf": torch.arange(4, dtype=torch.bfloat16), "view": torch.arange(100.0)[10:12],
            "rng": torch.get_rng_state(), "big": 2**70}
    save_checkpoint(saved, model, opt, **good)
    extra = load_checkpoint(saved, model, opt)
    assert_same_tree({k: v for k, v in extra.items() if k != "s"}, {k: v for k, v in good.items() if k != "s"})
    assert extra["s"] == good["s"]
    assert os.path.getsize(saved) < len(before) + 10_000  # the 2-element view did not drag its storage along


def test_failed_write_keeps_previous_checkpoint(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = saved.read_bytes()
    model, opt, _ = make()
    real_save = torch.save

    def dying_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(saved, model, opt)
    monkeypatch.setattr(torch, "save", real_save)
    assert saved.read_bytes() == before
    assert sorted(os.listdir(saved.parent)) == [saved.name]  # the temp file was removed
    load_checkpoint(saved, *make()[:2])


def test_metadata(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    meta = payload["metadata"]
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    assert meta["world_size"] == 1
    assert meta["torch_version"] == str(torch.__version__)
    assert meta["adams_dist_version"] == adams_dist.__version__
    assert meta["optimizer_class"] == "Adams_ZeRO" and meta["rule"] == "atan2" and meta["master_dtype"] == "float32"
    assert meta["params"][:2] == [["mix", [2, 8, 8], "float32"], ["inp.weight", [16, 6], "float32"]]
    assert meta["optimizer_params"] == ["inp.weight", "mix", "out.weight", "inp.bias", "out.bias"]
    assert meta["spectral"] == [[1, 16, 6], [2, 8, 8], [2, 8, 3, 1], None, None]  # out.weight: column heads
    assert set(meta["checksums"]) == {"model", "optimizer", "extra"}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(saved).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_wrapped_model_saves_portable_names(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, 0, 2)
    save_checkpoint(tmp_path / "c.pt", nn.DataParallel(model), opt)
    model2, opt2, _ = make(seed=1)
    load_checkpoint(tmp_path / "c.pt", model2, opt2)
    assert_equal_lists(params_of(model2), params_of(model), exact=True, what="unwrapped")


def test_plain_torch_optimizer_round_trip(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", model, opt, step=1)
    model2 = nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "c.pt", model2, opt2) == {"step": 1}
    assert_same_tree(opt2.state_dict(), opt.state_dict())
    assert_equal_lists(params_of(model2), params_of(model), exact=True, what="torch AdamW")


# ------------------------------------------------------------------------------------------------ crashes

# A zygote imports torch once and forks a saving child per trial (fast); the test SIGKILLs the child by pid.
_ZYGOTE = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, sys.argv[2])
    import adams_dist
    from adams_dist.checkpoint import save_checkpoint
    torch.set_num_threads(1)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped automatically
    model = torch.nn.Linear(1024, 1024)  # ~1M params: 16 MB with master and moments
    opt = adams_dist.AdamW(model.parameters())
    for line in sys.stdin:
        pid = os.fork()
        if pid:
            print("child", pid, flush=True)
            continue
        i = int(line)
        while True:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(i))  # the master aliases the fp32 param in one process
            save_checkpoint(sys.argv[1], model, opt, i=i)
            os.write(1, f"saved {i}\\n".encode())
            i += 1
""")


def _kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)
    raise AssertionError(f"saver {pid} did not die")


def test_sigkill_during_save_keeps_a_loadable_checkpoint(tmp_path: Path) -> None:
    """Kill a saving process at random moments and while its temp file is open: ``path`` always loads."""
    path = tmp_path / "ckpt.pt"
    repo = str(Path(__file__).resolve().parents[2])
    rng = random.Random(0)
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(path), repo], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True)
    assert zygote.stdin is not None and zygote.stdout is not None
    last, mid_write = -1, 0
    model = nn.Linear(1024, 1024)
    opt = adams_dist.AdamW(model.parameters())
    try:
        for trial in range(6):
            zygote.stdin.write(f"{(last + 1) * 1000}\n")
            zygote.stdin.flush()
            start = (last + 1) * 1000
            words = zygote.stdout.readline().split()
            while words and words[0] == "saved":  # skip what earlier children printed before they died
                words = zygote.stdout.readline().split()
            assert words[:1] == ["child"], words
            pid = int(words[1])
            try:
                words = zygote.stdout.readline().split()  # the child's first completed save
                assert words == ["saved", str(start)], words
                if trial % 2 == 0:
                    time.sleep(rng.uniform(0.0, 0.4))  # a random moment
                else:  # the moment a temporary file exists: mid-write, before os.replace
                    deadline = time.monotonic() + 20
                    while not any(n.startswith(".ckpt.pt.tmp-") for n in os.listdir(tmp_path)):
                        assert time.monotonic() < deadline, "no save started"
                    time.sleep(rng.uniform(0.0, 0.01))
            finally:
                _kill_and_wait(pid)
            mid_write += any(n.startswith(".ckpt.pt.tmp-") for n in os.listdir(tmp_path))
            i = load_checkpoint(path, model, opt)["i"]
            assert i > last and all(torch.equal(p, torch.full_like(p, float(i))) for p in model.parameters())
            assert all(torch.equal(opt.state[p]["master_param"], p.reshape(-1)) for p in model.parameters())
            last = i
    finally:
        zygote.kill()
        zygote.wait()
    assert mid_write >= 1, "no kill landed mid-write"
    save_checkpoint(path, model, opt, i=-1)  # a later save removes temp files of killed saves
    assert os.listdir(tmp_path) == ["ckpt.pt"]


# ------------------------------------------------------------------------------------------------ many processes
# One spawn of 4 processes serves every multi-process check (starting processes is the slow part): tasks run
# on process groups of 2, 3 or 4 of them, so a W=2 checkpoint saved by ranks {0, 1} is loaded by the fresh
# processes {2, 3} (W=2) and {1, 2, 3} (W=3), and the full group of 4 saves one for the 4 -> 1 check.


def _result(model: nn.Module, opt: Any) -> dict[str, Any]:
    return {"params": params_of(model), "lrs": [g["lr"] for g in opt.param_groups],
            "sigmas": [s.clone() for s in opt.spectral_sigmas().values()]}


def _dcp_get_and_set(rank: int, world: int, group: Any) -> str:
    """DCP's state-dict API at W ranks: get must not step a fresh optimizer; set is tried and reported."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt, sched = make(group=group)
    osd = get_optimizer_state_dict(model, opt)
    assert all(float(e["step"]) == 0 for e in osd["state"].values())
    assert all(torch.equal(opt.state[p]["u"], torch.ones_like(opt.state[p]["u"]))
               for p in model.parameters() if "u" in opt.state[p])
    train(model, opt, sched, 0, 2, rank, world)
    osd = get_optimizer_state_dict(model, opt)
    assert all(osd["state"][n]["exp_avg"].shape == p.shape for n, p in model.named_parameters())  # full, unsharded
    model2, opt2, _ = make(seed=2, group=group)
    model2.load_state_dict(model.state_dict())
    set_optimizer_state_dict(model2, opt2, osd)
    assert_same_tree(state_of(opt2), state_of(opt))
    return "ok"


def _distributed_errors(rank: int, world: int, group: Any, good: str, tmp: str) -> None:
    """Every error raises on every rank (no hang) and changes nothing."""
    last = world - 1
    model, opt, _ = make(seed=11, group=group)
    snap = snapshot(model, opt)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(os.path.join(tmp, "missing.pt"), model, opt)
    # The last rank sees no file (as on a filesystem the ranks do not share): the others are told.
    with pytest.raises(FileNotFoundError, match=f"failed on rank {last}" if rank != last else "no checkpoint at"):
        load_checkpoint(good if rank != last else os.path.join(tmp, "missing.pt"), model, opt)
    # The last rank reads a truncated copy.
    truncated = os.path.join(tmp, f"truncated-{rank}.pt")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"failed on rank {last} \(CheckpointError\)" if rank != last
                       else "truncated"):
        load_checkpoint(good if rank != last else truncated, model, opt)
    assert_unchanged(model, opt, snap)
    # A model of another shape, on every rank.
    small, small_opt, _ = make(hidden=8, group=group)
    with pytest.raises(CheckpointError, match="different model"):
        load_checkpoint(good, small, small_opt)
    # Saving fails on rank 0 (an unsupported extra; a path under a regular file): every rank raises.
    with pytest.raises(TypeError if rank == 0 else CheckpointError, match=r"extra\['fn'\]"):
        save_checkpoint(os.path.join(tmp, "x.pt"), model, opt, fn=print)
    blocker = os.path.join(tmp, "a-file")
    if rank == 0:
        open(blocker, "w").close()
    dist.barrier(group)
    with pytest.raises(OSError if rank == 0 else CheckpointError, match="a-file" if rank == 0 else "failed on rank 0"):
        save_checkpoint(os.path.join(blocker, "x.pt"), model, opt)
    assert not os.path.exists(os.path.join(tmp, "x.pt"))
    assert_unchanged(model, opt, snap)


def _save_sharded(directory: str, model: nn.Module, opt: Any, sched: Any, rank: int) -> None:
    """The sharded save: optimizer rows by every rank through DCP; model and scheduler (replicated) by rank 0."""
    adams_dist.save_sharded_optimizer(directory, opt)
    if rank == 0:
        torch.save({"model": model.state_dict(), "scheduler": sched.state_dict()}, os.path.join(directory, "rest.pt"))


def _load_sharded(directory: str, model: nn.Module, opt: Any, sched: Any) -> int:
    rest = torch.load(os.path.join(directory, "rest.pt"), weights_only=True)
    model.load_state_dict(rest["model"])
    sched.load_state_dict(rest["scheduler"])
    adams_dist.load_sharded_optimizer(directory, opt)
    return K


def _own_rows_only(opt: Any) -> bool:
    """Whether the sharded state dict holds this rank's rows of the master weights and no more."""
    from adams_dist.fsdp import local_tensor

    entries = opt.sharded_state_dict()["state"].values()
    held = sum(local_tensor(e["master_param"]).numel() for e in entries)
    return held == sum(opt.state[p]["master_param"].numel() for g in opt.param_groups for p in g["params"])


def dist_worker(rank: int, world: int, tasks: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Run ``(name, kind, members, *args)`` tasks in order; ``members``: the ranks of its group (None: all)."""
    out: dict[str, Any] = {}
    for name, kind, members, *args in tasks:
        group = dist.new_group(list(members)) if world > 1 and members is not None else None
        members = list(range(world)) if members is None else list(members)
        if rank in members:
            r, w = members.index(rank), len(members)
            if kind in ("save", "save_sharded"):  # train K, save, train J: the uninterrupted run
                model, opt, sched = make(group=group)
                train(model, opt, sched, 0, K, r, w)
                if kind == "save":
                    save_checkpoint(args[0], model, opt, scheduler=sched.state_dict(), step=K)
                else:
                    assert _own_rows_only(opt)
                    _save_sharded(args[0], model, opt, sched, r)
                train(model, opt, sched, K, J, r, w)
                out[name] = _result(model, opt)
            elif kind in ("load", "load_sharded"):  # fresh model and optimizer, load, train J
                model, opt, sched = make(seed=100 + rank, group=group)
                if kind == "load":
                    extra = load_checkpoint(args[0], model, opt)
                    sched.load_state_dict(extra["scheduler"])
                    start = extra["step"]
                else:
                    start = _load_sharded(args[0], model, opt, sched)
                train(model, opt, sched, start, J, r, w)
                out[name] = _result(model, opt)
            elif kind == "errors":
                _distributed_errors(r, w, group, *args)
            elif kind == "dcp":
                out[name] = _dcp_get_and_set(r, w, group)
        if world > 1:
            dist.barrier()
    return out


def assert_results(got: list[dict[str, Any]], key: str, want: dict[str, Any], exact: bool, what: str) -> None:
    assert any(key in res for res in got), key
    for rank, res in enumerate(got):
        if key in res:
            assert_equal_lists(res[key]["params"], want["params"], exact, f"{what}, rank {rank}")
            assert_equal_lists(res[key]["sigmas"], want["sigmas"], exact, f"{what} sigmas, rank {rank}")
            assert res[key]["lrs"] == want["lrs"], what


def test_distributed_resume_and_world_size_changes(tmp_path: Path) -> None:
    """2 -> 2 bit for bit in fresh processes; 2 -> 3, 1 -> 2, 4 -> 1 within fp32 tolerance; errors on all ranks."""
    w1, w2, w4 = (str(tmp_path / f"w{w}.pt") for w in (1, 2, 4))
    s1, s2, s4 = (str(tmp_path / f"sharded-w{w}") for w in (1, 2, 4))
    ref1 = dist_worker(0, 1, [("ref", "save", None, w1)])["ref"]  # W=1, in this process
    ref1s = dist_worker(0, 1, [("ref", "save_sharded", None, s1)])["ref"]
    got = run(dist_worker, 4, [
        ("dcp", "dcp", (0, 1)),
        ("ref2", "save", (0, 1), w2),
        ("2->2", "load", (2, 3), w2),  # processes that took no part in the saving run
        ("2->3", "load", (1, 2, 3), w2),
        ("1->2", "load", (2, 3), w1),
        ("errors", "errors", None, w2, str(tmp_path)),
        ("ref4", "save", None, w4),
        ("ref2s", "save_sharded", (0, 1), s2),
        ("2->2s", "load_sharded", (2, 3), s2),
        ("2->3s", "load_sharded", (1, 2, 3), s2),
        ("1->2s", "load_sharded", (2, 3), s1),
        ("ref4s", "save_sharded", None, s4),
    ], timeout=280)
    meta = {w: torch.load(p, weights_only=True)["metadata"]["world_size"] for w, p in ((1, w1), (2, w2), (4, w4))}
    assert meta == {1: 1, 2: 2, 4: 4}
    assert {got[r]["dcp"] for r in (0, 1)} == {"ok"}
    ref2, ref4 = got[0]["ref2"], got[0]["ref4"]
    assert_results(got, "ref2", ref2, exact=True, what="the two saving ranks agree")
    assert_results(got, "2->2", ref2, exact=True, what="2 -> 2 in fresh processes")
    assert_results(got, "2->3", ref2, exact=False, what="2 -> 3")
    assert_results(got, "1->2", ref1, exact=False, what="1 -> 2")
    assert_results(got, "ref4", ref4, exact=True, what="the four saving ranks agree")
    four_to_one = dist_worker(0, 1, [("4->1", "load", None, w4)])["4->1"]
    assert_results([{"4->1": four_to_one}], "4->1", ref4, exact=False, what="4 -> 1")
    assert_results([{"ref4": ref4}], "ref4", ref1, exact=False, what="W=4 vs W=1 uninterrupted")
    assert_results([{"ref2": ref2}], "ref2", ref1, exact=False, what="W=2 vs W=1 uninterrupted")
    # Sharded (DCP) checkpoints: the same runs, each rank writing only its rows.
    assert_results([{"ref": ref1s}], "ref", ref1, exact=True, what="sharded save leaves the W=1 run unchanged")
    assert_results(got, "ref2s", ref2, exact=True, what="sharded save leaves the W=2 run unchanged")
    assert_results(got, "2->2s", ref2, exact=True, what="sharded 2 -> 2 in fresh processes")
    assert_results(got, "2->3s", ref2, exact=False, what="sharded 2 -> 3")
    assert_results(got, "1->2s", ref1, exact=False, what="sharded 1 -> 2")
    four_to_one = dist_worker(0, 1, [("4->1s", "load_sharded", None, s4)])["4->1s"]
    assert_results([{"4->1s": four_to_one}], "4->1s", got[0]["ref4s"], exact=False, what="sharded 4 -> 1")
