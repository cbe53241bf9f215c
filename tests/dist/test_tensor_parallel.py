"""Tensor parallelism (issue 15, item 4): the optimizer on TP and FSDP + TP DTensor parameters matches one
process, for a colwise/rowwise MLP, a transformer block with TP'd attention heads, and a checkpoint that
moves from FSDP + TP to FSDP2 and to one process.

Placements seen in torch 2.13 (CPU, gloo), parameters and their ``.grad`` after backward alike:

    TP, 1-D mesh of 2          ColwiseParallel weight/bias   (Shard(0),)
                               RowwiseParallel weight        (Shard(1),)    bias (Replicate(),)
                               the rest (distribute_module)  (Replicate(),)
    FSDP + TP, ("dp", "tp")    colwise weight/bias           (_StridedShard(dim=0, sf=2), Shard(0))
    2x2 mesh, fully_shard on   rowwise weight                (Shard(0), Shard(1))
    mesh["dp"] after TP        rowwise bias, the rest        (Shard(0), Replicate())

The gradients are already the true ones on every rank (Replicate, not Partial): the TP styles all-reduce
them in backward, fully_shard averages them over "dp" (checked against one process while writing this file).

The spectral paths covered: row heads straddling shards (``up``), a matrix whose columns are split (``down``:
W v summed over ranks), column heads split by whole heads (the block's ``o``), and replicas along "tp".
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rule_table import BY_NAME

import adams_dist
from adams_dist.testing import run

STEPS, CLIP = 5, 0.1
HP = {name: dict(BY_NAME[name].hp["dist"], max_grad_norm=CLIP) for name in ("adams", "adamw", "homeadam")}
# HomeAdam's tau puts these clipped gradients in its SGD branch, where lr 1e-3 moves a weight ~1e-5: too little
# to tell from the tolerance. A larger lr moves every weight by > 1e-3, as the other rules do.
HP["homeadam"]["lr"] = 0.3
TOL = {"rtol": 1e-5, "atol": 1e-6}
Batch = tuple[torch.Tensor, torch.Tensor]

# ------------------------------------------------------------------------------------------------ models


class Net(nn.Module):
    """An MLP: ``up`` is ColwiseParallel, ``down`` RowwiseParallel, ``inp`` and ``ln`` replicated."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 7)
        self.ln = nn.LayerNorm(7)
        self.up = nn.Linear(7, 12)  # 3 heads of 4 rows, 6 rows a rank: the middle head straddles the shards
        self.down = nn.Linear(12, 5)  # one matrix; RowwiseParallel splits its columns: W v needs a sum over ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.ln(torch.tanh(self.inp(x))))))

    def tp_plan(self) -> dict:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {"up": ColwiseParallel(), "down": RowwiseParallel()}

    def replicated(self) -> list[nn.Module]:
        return [self.inp, self.ln]

    def mark(self) -> None:
        """Set after parallelize_module / fully_shard, which replace the Parameter objects."""
        adams_dist.set_heads(self.up.weight, 3)

    @staticmethod
    def batch(step: int, index: int) -> Batch:
        g = torch.Generator().manual_seed(1000 * step + index)
        return torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)


HEADS, HEAD_DIM, DIM = 4, 3, 7


class Block(nn.Module):
    """A pre-norm transformer block. The fused ``qkv`` (rows ordered head, then q/k/v, as Megatron lays it
    out) is ColwiseParallel, so each rank holds the q, k and v of HEADS / W whole heads and attends over them
    alone; ``o`` and ``down`` are RowwiseParallel, the LayerNorms replicated."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        # no q/k/v biases: a key bias gets no gradient (softmax ignores it) and would never move
        self.qkv = nn.Linear(DIM, HEADS * 3 * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM)
        # 10, not 9: RowwiseParallel rebuilds its input DTensor as even shards (9 fails in sharding propagation)
        self.up, self.down = nn.Linear(DIM, 10), nn.Linear(10, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)

        y = self.qkv(h)  # the local heads: the last dim is 3 * HEAD_DIM * local heads
        q, k, v = y.view(b, t, y.shape[-1] // (3 * HEAD_DIM), 3, HEAD_DIM).transpose(1, 2).unbind(3)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))

    def tp_plan(self) -> dict:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {"qkv": ColwiseParallel(), "o": RowwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel()}

    def replicated(self) -> list[nn.Module]:
        return [self.ln1, self.ln2]

    def mark(self) -> None:
        adams_dist.set_heads(self.qkv.weight, 3 * HEADS)  # q, k and v of every head: 3 * HEADS matrices
        adams_dist.set_heads(self.o.weight, HEADS, dim=1)

    @staticmethod
    def batch(step: int, index: int) -> Batch:
        g = torch.Generator().manual_seed(1000 * step + index)
        return torch.randn(2, 5, DIM, generator=g), torch.randn(2, 5, DIM, generator=g)


MODELS = {"net": Net, "block": Block}

# ----------------------------------------------------------------------------------------------- helpers


def replicate(module: nn.Module, mesh) -> None:
    """Replicate() DTensor parameters (the optimizer takes no mix of DTensor and plain parameters). The
    inputs become Replicate DTensors and the output local again, as the TP styles around it expect."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    distribute_module(
        module, mesh,
        input_fn=lambda mod, inputs, m: tuple(DTensor.from_local(x, m, [Replicate()], run_check=False)
                                              for x in inputs),
        output_fn=lambda mod, out, m: out.to_local())


def build(model_name: str, layout: str, world: int) -> tuple[nn.Module, int]:
    """The model in ``layout`` ("tp" on a 1-D mesh, "fsdp+tp" on a 2x2 ("dp", "tp") mesh, "fsdp" on a 1-D
    mesh) with its optimizer attributes set, and the batch this rank trains on (its "dp" coordinate)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if layout == "tp":
        tp_mesh, dp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), None
    elif layout == "fsdp+tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    else:
        tp_mesh, dp_mesh = None, init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = MODELS[model_name]()
    if tp_mesh is not None:
        parallelize_module(model, tp_mesh, model.tp_plan())
        for module in model.replicated():
            replicate(module, tp_mesh)
    if dp_mesh is not None:  # after TP, as torchtitan does: FSDP shards the TP shards over "dp"
        fully_shard(model, mesh=dp_mesh)
    model.mark()
    return model, 0 if dp_mesh is None else dp_mesh.get_local_rank()


def loss_of(model: nn.Module, b: Batch) -> torch.Tensor:
    return F.mse_loss(model(b[0]), b[1])


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, batches: Callable[[int], list[Batch]]) -> None:
    """Each step on the mean loss of ``batches(step)``: the one process's stand-in for averaging over "dp"."""
    for step in steps:
        bs = batches(step)
        (sum(loss_of(model, b) for b in bs) / len(bs)).backward()
        opt.step()
        opt.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def layouts(model: nn.Module) -> dict[str, tuple[str, str]]:
    """(param placements, grad placements) by name after one backward pass, for the checks below."""
    return {n: (str(tuple(p.placements)), str(tuple(p.grad.placements))) for n, p in model.named_parameters()}


def dist_worker(rank: int, world: int, model_name: str, layout: str) -> dict:
    """Every rule in ``layout``: final full parameters, spectral sigmas, last grad norm; and the layouts."""
    model, dp = build(model_name, layout, world)
    loss_of(model, model.batch(0, dp)).backward()  # no optimizer yet: the placements torch gives by itself
    out: dict = {"layouts": layouts(model)}
    for name in HP:
        model, dp = build(model_name, layout, world)
        opt = adams_dist.create_optimizer(name, model.parameters(), **HP[name])
        train(model, opt, range(STEPS), lambda step: [model.batch(step, dp)])
        out[name] = {"params": [full(p) for p in model.parameters()],
                     "sigmas": [full(s) for s in opt.spectral_sigmas().values()],
                     "norm": float(opt.last_grad_norm)}
    return out


def reference(model_name: str, name: str, n_dp: int, steps: int = STEPS) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One process, same init and batches, on the mean gradient of the ``n_dp`` batches of each step."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    init = [full(p) for p in model.parameters()]
    model.mark()
    opt = adams_dist.create_optimizer(name, model.parameters(), **HP[name])
    train(model, opt, range(steps), lambda step: [model.batch(step, d) for d in range(n_dp)])
    for (n, p), p0 in zip(model.named_parameters(), init, strict=True):  # every parameter really moved
        assert (p.detach() - p0).abs().max() > 1e-3, n
    return model, opt


def assert_matches(results: list[dict], name: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank's rule ``name`` ended where the one process did."""
    assert float(opt.last_grad_norm) > 2 * CLIP  # the clipping binds: the global norm matters
    sigmas = list(opt.spectral_sigmas().values())
    for rank, res in enumerate(r[name] for r in results):
        for (n, exp), got in zip(model.named_parameters(), res["params"], strict=True):
            torch.testing.assert_close(got, exp.detach(), **TOL, msg=lambda m, n=n: f"rank {rank} {n}: {m}")
        assert res["norm"] == pytest.approx(float(opt.last_grad_norm), rel=1e-5)
        assert len(res["sigmas"]) == len(sigmas)
        for got, exp in zip(res["sigmas"], sigmas):
            torch.testing.assert_close(got, exp, **TOL)


@functools.cache
def dist_results(model_name: str, layout: str, world: int) -> list[dict]:
    return run(dist_worker, world, model_name, layout, timeout=300)  # one spawn serves every rule


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(HP))
def test_tp_colwise_rowwise_matches_single_process(name: str) -> None:
    """W=2, pure TP: every rank trains on the same batch, as the one process does."""
    model, opt = reference("net", name, 1)
    results = dist_results("net", "tp", 2)
    assert results[0]["layouts"]["up.weight"] == ("(Shard(dim=0),)",) * 2
    assert results[0]["layouts"]["down.weight"] == ("(Shard(dim=1),)",) * 2
    assert results[0]["layouts"]["ln.weight"] == ("(Replicate(),)",) * 2
    assert_matches(results, name, model, opt)
    if name == "adams":
        assert [s.numel() for s in opt.spectral_sigmas().values()] == [1, 3, 1]  # inp, up, down


@pytest.mark.parametrize("name", list(HP))
def test_fsdp_tp_matches_single_process(name: str) -> None:
    """W=4 on a 2x2 ("dp", "tp") mesh: the two dp groups see different batches; the one process trains on
    their mean loss, which is the gradient fully_shard averages."""
    model, opt = reference("net", name, 2)
    results = dist_results("net", "fsdp+tp", 4)
    assert results[0]["layouts"]["down.weight"][0] == "(Shard(dim=0), Shard(dim=1))"
    assert results[0]["layouts"]["inp.weight"][0] == "(Shard(dim=0), Replicate())"
    assert_matches(results, name, model, opt)


@pytest.mark.parametrize("name", list(HP))
def test_tp_attention_heads_match_single_process(name: str) -> None:
    """W=2: a transformer block whose column-sharded fused qkv holds 2 of the 4 heads on each rank (Shard(0)),
    the output projection Shard(1) with its heads as column blocks (2 whole heads a rank), a colwise/rowwise
    MLP, replicated LayerNorms; the same batch everywhere."""
    model, opt = reference("block", name, 1)
    results = dist_results("block", "tp", 2)
    assert results[0]["layouts"]["qkv.weight"][0] == "(Shard(dim=0),)"
    assert results[0]["layouts"]["o.weight"][0] == "(Shard(dim=1),)"
    assert_matches(results, name, model, opt)
    if name == "adams":
        assert [s.numel() for s in opt.spectral_sigmas().values()] == [3 * HEADS, HEADS, 1, 1]  # qkv o up down


# ---------------------------------------------------------------------------------------------- checkpoint

K, J = 3, 3  # steps before the checkpoint, steps after it


def checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    state = checkpoint_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])


def save_worker(rank: int, world: int, layout: str, path: str) -> list[torch.Tensor]:
    """``layout`` trains K steps, each dp group on its own batch, and saves."""
    import torch.distributed.checkpoint as dcp

    model, dp = build("net", layout, world)
    opt = adams_dist.Adams_ZeRO(model.parameters(), **HP["adams"])
    train(model, opt, range(K), lambda step: [Net.batch(step, dp)])
    dcp.save(checkpoint_state(model, opt), checkpoint_id=path)
    return [full(p) for p in model.parameters()]


def resume_worker(rank: int, world: int, layout: str, path: str) -> list[torch.Tensor]:
    """``layout`` loads the checkpoint and trains J more steps; dp ranks 0 and 1 take batches 0 and 1."""
    model, dp = build("net", layout, world)
    opt = adams_dist.Adams_ZeRO(model.parameters(), **HP["adams"])
    load_checkpoint(model, opt, path)
    train(model, opt, range(K, K + J), lambda step: [Net.batch(step, dp)])
    return [full(p) for p in model.parameters()]


def resume_single_process(path: str) -> list[torch.Tensor]:
    """The checkpoint loaded into a plain model and optimizer in this process, with no process group."""
    torch.manual_seed(5)  # another init: the checkpoint must overwrite all of it
    model = Net()
    model.mark()
    opt = adams_dist.Adams_ZeRO(model.parameters(), **HP["adams"])
    load_checkpoint(model, opt, path)
    train(model, opt, range(K, K + J), lambda step: [Net.batch(step, d) for d in range(2)])
    return [full(p) for p in model.parameters()]


def test_checkpoint_moves_from_fsdp_tp_to_fsdp_and_one_process() -> None:
    """FSDP + TP (2x2, W=4) saves after K steps; FSDP2 at W=2 and one process load it and train J more steps.
    Every layout averages batches 0 and 1 each step, so all equal one uninterrupted process of K + J steps."""
    at_k, _ = reference("net", "adams", 2, steps=K)
    at_end, _ = reference("net", "adams", 2, steps=K + J)
    with tempfile.TemporaryDirectory() as tmp:
        saved = run(save_worker, 4, "fsdp+tp", tmp, timeout=300)
        fsdp = run(resume_worker, 2, "fsdp", tmp, timeout=300)
        single = resume_single_process(tmp)
    for res in saved:
        for got, exp in zip(res, at_k.parameters(), strict=True):
            torch.testing.assert_close(got, exp.detach(), **TOL)
    for where, res in [*((f"FSDP2 rank {r}", x) for r, x in enumerate(fsdp)), ("one process", single)]:
        for (n, exp), got in zip(at_end.named_parameters(), res, strict=True):
            torch.testing.assert_close(got, exp.detach(), **TOL, msg=lambda m, n=n: f"{where} {n}: {m}")


# ------------------------------------------------------------------------------------------------- refusals


def refusal_worker(rank: int, world: int) -> list[str]:
    """Construction errors, the same on every rank: a layout the power step cannot serve is named."""
    from torch.distributed.tensor import DTensor, Partial

    model, _ = build("net", "tp", world)
    adams_dist.set_heads(model.down.weight, 3, dim=1)  # 12 columns, 6 a rank: its heads of 4 are torn
    messages = []
    for params in (list(model.parameters()),
                   [nn.Parameter(DTensor.from_local(torch.zeros(4, 4), model.up.weight.device_mesh, [Partial()]))]):
        try:
            adams_dist.Adams_ZeRO(params, lr=1e-3)
            messages.append("")
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_layouts_the_power_step_cannot_serve_are_refused() -> None:
    for torn, partial in run(refusal_worker, 2, timeout=120):
        assert "(5, 12) with placements (Shard(dim=1),)" in torn and "column heads split by whole heads" in torn
        assert "Partial" in partial and "only Shard and Replicate placements" in partial


# ------------------------------------------------------------------------------------ hand-placed DTensors

# (shape, placement on a 1-D mesh of 4): 3 columns over 4 ranks leave one rank an empty block
PLACED = [((6, 3), "col"), ((9, 6), "col"), ((5, 6), "row"), ((7,), "rep")]


def placed_params(dtype: torch.dtype) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(5)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s, _ in PLACED]


def placed_grad(step: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + sum(shape)))


def placed_train(params: list[nn.Parameter], make_grad: Callable, name: str, **engine) -> None:
    opt = adams_dist.create_optimizer(name, params, lr=1e-2, weight_decay=0.5, **engine)
    for step in range(4):
        for p in params:
            p.grad = make_grad(step, p)
        opt.step()


def placed_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    where = {"col": [Shard(1)], "row": [Shard(0)], "rep": [Replicate()]}
    out = {}
    for name, dtype, engine in (("adams", torch.float32, {}), ("adamw", torch.bfloat16, {"master_dtype": None})):
        params = [nn.Parameter(distribute_tensor(p.detach(), mesh, where[k]))
                  for p, (_, k) in zip(placed_params(dtype), PLACED)]
        placed_train(params, lambda step, p: distribute_tensor(placed_grad(step, tuple(p.shape)).to(p.dtype),
                                                               mesh, p.placements), name, **engine)
        out[name] = [p.full_tensor().detach().clone() for p in params]
    return out


def test_hand_placed_blocks_match_one_process() -> None:
    """W=4, Shard(1) blocks with an empty one, Shard(0), Replicate: Adams against one process; bf16 AdamW
    without a master, its stochastic rounding indexed by global element, bit for bit."""
    results = run(placed_worker, 4, timeout=120)
    for name, dtype, engine in (("adams", torch.float32, {}), ("adamw", torch.bfloat16, {"master_dtype": None})):
        params = placed_params(dtype)
        placed_train(params, lambda step, p: placed_grad(step, tuple(p.shape)).to(p.dtype), name, **engine)
        for res in results:
            for got, exp in zip(res[name], params):
                if dtype == torch.bfloat16:
                    assert torch.equal(got, exp.detach())
                else:
                    torch.testing.assert_close(got, exp.detach(), **TOL)
