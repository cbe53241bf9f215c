"""transformers.Trainer with adams_dist.integrations.hf.AdamsTrainer: a tiny GPT-2 from config, W=2, gloo.

One run trains 6 steps and saves at step 3; another resumes from that checkpoint: the losses must be
the same. DDP's all-reduce must be off (each rank's gradients stay its own until the optimizer
averages them), the optimizer's traffic per step must be one reduce-scatter and one all-gather of the
model, and the sharded checkpoint must load at another world size with the same state.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import adams_dist
from adams_dist.testing import run
from frameworks import needs

STEPS, SAVE_AT, BATCH, SEQ, VOCAB = 6, 3, 2, 16, 64
WATCHED = "transformer.h.0.mlp.c_fc.weight"


def _trainer(rank: int, world: int, out: str, extra_callbacks: list[Any], plain: bool = False) -> Any:
    import transformers

    from adams_dist.integrations.hf import AdamsTrainer

    # What torchrun sets; the process group itself is already up (adams_dist.testing.run)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29555"))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = adams_dist.Adams_ZeRO(adams_dist.param_groups(model, lr=3e-3), lr=3e-3)
    tokens = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH, save_strategy="steps",
        save_steps=SAVE_AT, logging_steps=1, max_grad_norm=0.5, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    return (transformers.Trainer if plain else AdamsTrainer)(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                        callbacks=extra_callbacks)


def _train(rank: int, world: int, out: str, resume: str | None, plain: bool = False) -> dict[str, Any]:
    import transformers

    from adams_dist.integrations.hf import unwrap

    seen: dict[str, Any] = {"local_grads": [], "bytes": [], "state_at_save": None, "state_at_start": None}

    class Watch(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen["state_at_start"] = unwrap(kw["optimizer"]).state_dict()
            seen["bytes_before"] = unwrap(kw["optimizer"]).bytes_sent

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen["local_grads"].append(dict(trainer.model.named_parameters())[WATCHED].grad.clone())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen["bytes"].append(unwrap(kw["optimizer"]).bytes_sent)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == SAVE_AT:
                seen["state_at_save"] = unwrap(kw["optimizer"]).state_dict()  # a collective: every rank

    trainer = _trainer(rank, world, out, [Watch()], plain)
    trainer.train(resume_from_checkpoint=resume)
    seen["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seen["params"] = [p.detach().clone() for p in trainer.model.parameters()]
    seen["n_param_bytes"] = sum(p.numel() * 4 for p in trainer.model.parameters())
    seen["ddp"] = type(trainer.model_wrapped).__name__
    return seen


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for index, entry in a["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name])), (index, name)


def test_trainer_at_w2_resumes_exactly_without_ddp_allreduce(tmp_path) -> None:
    needs("transformers")
    full = run(_train, 2, str(tmp_path / "full"), None, timeout=300)
    ckpt = str(tmp_path / "full" / f"checkpoint-{SAVE_AT}")
    assert os.path.isdir(os.path.join(ckpt, "adams_optimizer")) and not os.path.exists(
        os.path.join(ckpt, "optimizer.pt")), os.listdir(ckpt)

    assert full[0]["ddp"] == "DistributedDataParallel"  # Trainer wrapped the model...
    for step, (g0, g1) in enumerate(zip(full[0]["local_grads"], full[1]["local_grads"])):
        assert not torch.equal(g0, g1), f"step {step}: DDP averaged the gradients"  # ...and did not all-reduce
    # Per step: one reduce-scatter of fp32 gradients and one all-gather of fp32 parameters, each sending
    # (W-1)/W of the model in a ring; a few bytes more for the control all-reduce and the clipping norm.
    model_bytes = full[0]["n_param_bytes"]
    per_step = torch.diff(torch.tensor([full[0]["bytes_before"], *full[0]["bytes"]])).tolist()
    del per_step[SAVE_AT]  # the save after step SAVE_AT: the state_dict() gathers of this test's callback
    for sent in per_step:
        assert model_bytes <= sent <= model_bytes * 1.05 + 4096, (per_step, model_bytes)

    resumed = run(_train, 2, str(tmp_path / "resumed"), ckpt, timeout=300)
    for rank in range(2):
        assert len(resumed[rank]["losses"]) == STEPS  # the first SAVE_AT come from the checkpoint's log
        assert resumed[rank]["losses"] == full[rank]["losses"], (resumed[rank]["losses"], full[rank]["losses"])
        for p, q in zip(resumed[rank]["params"], full[rank]["params"]):
            assert torch.equal(p, q)
        _same_state(resumed[rank]["state_at_start"], full[rank]["state_at_save"])

    one = run(_train, 1, str(tmp_path / "at_w1"), ckpt, timeout=300)[0]  # the W=2 checkpoint at W=1
    _same_state(one["state_at_start"], full[0]["state_at_save"])


def test_trainer_resumes_from_a_plain_trainer_checkpoint(tmp_path) -> None:
    """A checkpoint of transformers.Trainer itself (optimizer.pt, one process) resumes under AdamsTrainer."""
    needs("transformers")
    plain = run(_train, 1, str(tmp_path / "plain"), None, True, timeout=300)[0]
    ckpt = str(tmp_path / "plain" / f"checkpoint-{SAVE_AT}")
    assert os.path.isfile(os.path.join(ckpt, "optimizer.pt"))
    resumed = run(_train, 1, str(tmp_path / "resumed"), ckpt, timeout=300)[0]
    _same_state(resumed["state_at_start"], plain["state_at_save"])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(plain["losses"]), rtol=1e-6, atol=0)
