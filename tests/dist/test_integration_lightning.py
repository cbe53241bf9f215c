"""Lightning recipe: DDP at W = 2 on CPU/gloo with an adams_dist optimizer and AdamsDDPStrategy.

One spawn of 2 processes serves every check (importing lightning is the slow part). Lightning finds
the ranks the way it finds torchrun's: MASTER_ADDR/MASTER_PORT/LOCAL_RANK/... in the environment.
Each rank runs, in order: 3 uninterrupted epochs; 1 epoch that ModelCheckpoint saves; a resume from
that checkpoint to epoch 3; and 1 epoch with Lightning's plain DDPStrategy, the control showing what
the all-reduce checks see when DDP does all-reduce. Ranks see different data (DistributedSampler).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from frameworks import needs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adams_dist
from adams_dist.testing import free_port, run

L = needs("lightning")

EPOCHS, K = 3, 1  # epochs in all, epochs before the checkpoint
STEPS_PER_EPOCH = 4  # 64 samples / (2 ranks x batch 8)
HINT = "ddp_without_allreduce"  # adams_dist's warning about a DDP module that still all-reduces


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.losses: list[float] = []
        self.all_reduces = 0  # gloo all-reduces during backward: DDP's gradient traffic
        self.local_grads: list[torch.Tensor] = []  # the gradients each step hands to the optimizer
        self.restored: dict[str, Any] | None = None  # the optimizer's state when training starts

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()

    def on_after_backward(self) -> None:
        self._prof.__exit__(None, None, None)
        self.all_reduces += sum(e.name == "gloo:all_reduce" for e in self._prof.events())

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.local_grads.append(self.net[0].weight.grad.clone())

    def on_train_start(self) -> None:
        self.restored = self.trainer.optimizers[0].state_dict()  # a collective: every rank gets here

    def configure_optimizers(self) -> adams_dist.Adams_ZeRO:
        return adams_dist.Adams_ZeRO(self.parameters(), lr=1e-2, weight_decay=0.1)

    def train_dataloader(self) -> DataLoader:
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8, shuffle=True)


def fit(strategy: Any, tmp: str, epochs: int, ckpt_path: str | None = None, callbacks: list | None = None) -> dict:
    net = Net()
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy=strategy, max_epochs=epochs,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(callbacks), callbacks=callbacks, default_root_dir=tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(net, ckpt_path=ckpt_path)
    return {"losses": net.losses, "all_reduces": net.all_reduces, "local_grads": net.local_grads,
            "restored": net.restored, "params": [p.detach().clone() for p in net.parameters()],
            "warnings": [str(w.message) for w in caught if HINT in str(w.message)]}


def worker(rank: int, world: int, port: int, tmp: str) -> dict:
    from adams_dist.integrations.lightning import AdamsDDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    timeout = datetime.timedelta(seconds=60)  # a collective that waits longer fails the rank
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, filename="k", every_n_epochs=1)
    return {
        "full": fit(AdamsDDPStrategy(timeout=timeout), tmp, EPOCHS),
        "first": fit(AdamsDDPStrategy(timeout=timeout), tmp, K, callbacks=[ckpt]),
        "resumed": fit(AdamsDDPStrategy(timeout=timeout), tmp, EPOCHS, ckpt_path=str(Path(tmp) / "k.ckpt")),
        "plain": fit(L.pytorch.strategies.DDPStrategy(timeout=timeout), tmp, 1),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("lightning")
    out = run(worker, 2, free_port(), str(tmp), process_group=False, timeout=150)
    checkpoint = torch.load(tmp / "k.ckpt", weights_only=False)
    return [{**r, "checkpoint": checkpoint} for r in out]


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(ranks: list[dict]) -> None:
    k = K * STEPS_PER_EPOCH
    for rank, out in enumerate(ranks):
        full, first, resumed = out["full"], out["first"], out["resumed"]
        assert len(full["losses"]) == EPOCHS * STEPS_PER_EPOCH, rank
        assert first["losses"] == full["losses"][:k], rank
        assert resumed["losses"] == full["losses"][k:], rank
        for p, q in zip(resumed["params"], full["params"]):
            assert torch.equal(p, q), rank
        # The optimizer Lightning restored holds exactly the state the checkpoint saved.
        assert resumed["restored"]["state"], rank
        assert same(resumed["restored"], out["checkpoint"]["optimizer_states"][0]), rank


def test_ddp_does_not_all_reduce_the_gradients(ranks: list[dict]) -> None:
    for rank, out in enumerate(ranks):
        for run_name in ("full", "first", "resumed"):
            assert out[run_name]["all_reduces"] == 0, (rank, run_name)
            assert out[run_name]["warnings"] == [], (rank, run_name)
        # The control: plain DDPStrategy all-reduces in backward, and adams_dist warns about it.
        assert out["plain"]["all_reduces"] > 0, rank
        assert len(out["plain"]["warnings"]) == 1, rank
        # Averaging an average is exact at W = 2: the hook changes the traffic, not the training.
        assert out["plain"]["losses"] == out["full"]["losses"][:STEPS_PER_EPOCH], rank
    zero, one = ranks
    # Each rank's optimizer gets its own local gradients; with DDP's all-reduce on they are the average.
    for g0, g1 in zip(zero["full"]["local_grads"], one["full"]["local_grads"]):
        assert not torch.equal(g0, g1)
    for g0, g1 in zip(zero["plain"]["local_grads"], one["plain"]["local_grads"]):
        assert torch.equal(g0, g1)
    assert zero["full"]["losses"] != one["full"]["losses"]  # the ranks do see different data


def test_both_ranks_end_with_the_same_parameters(ranks: list[dict]) -> None:
    zero, one = ranks
    for run_name in ("full", "first", "resumed", "plain"):
        for p, q in zip(zero[run_name]["params"], one[run_name]["params"]):
            assert torch.equal(p, q), run_name


def test_the_strategy_refuses_a_second_comm_hook() -> None:
    from adams_dist.integrations.lightning import AdamsDDPStrategy

    with pytest.raises(ValueError, match="ddp_comm_hook"):
        AdamsDDPStrategy(ddp_comm_hook=lambda state, bucket: None)


def test_adams_dist_imports_without_lightning() -> None:
    code = "import sys, adams_dist, adams_dist.integrations; print(sorted(m for m in sys.modules if 'lightning' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
