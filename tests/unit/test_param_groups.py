"""adams_dist.param_groups: spectral decay only on linear/conv weights, per head where the heads are knowable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from frameworks import needs
from torch import nn

import adams_dist
from adams_dist.spectral import SpectralShape

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import gpt  # noqa: E402

LR, WD, SVWD = 0.1, 0.5, 0.25


def _decay_of(groups: adams_dist.ParamGroups) -> dict[str, str]:
    return {d.name: d.decay for d in groups.decisions}


def _heads(p: torch.Tensor) -> int | None:
    shape = SpectralShape.of(p)
    return None if shape is None else shape.heads


def test_example_gpt_groups_and_the_engine_applies_them() -> None:
    torch.manual_seed(0)
    model = gpt.GPT(block_size=16, n_layer=1, n_head=4, d_model=32)
    groups = adams_dist.param_groups(model, lr=LR, weight_decay=WD, scalar_vector_weight_decay=SVWD)
    decay = _decay_of(groups)
    assert decay == {name: ("spectral" if name.endswith(("qkv.weight", "proj.weight", "fc.weight")) else "scalar")
                     for name, _ in model.named_parameters()}
    assert _heads(model.blocks[0].attn.qkv.weight) == 12  # 3 * n_head, kept from the model's own mark
    assert _heads(model.tok_emb.weight) is None and _heads(model.pos_emb.weight) is None
    text = str(groups)
    assert all(name in text for name in decay) and "embedding" in text

    # With zero gradients the update is zero: what moves the weights is the decay alone.
    before = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    opt = adams_dist.Adams_ZeRO(groups)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    for name in ("tok_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight"):
        want = before[name] * (1 - LR * SVWD)
        torch.testing.assert_close(after[name].detach().double(), want, rtol=1e-6, atol=1e-7, msg=name)
    qkv = after["blocks.0.attn.qkv.weight"].detach().double() - before["blocks.0.attn.qkv.weight"]
    sv = torch.linalg.svdvals(qkv.view(12, 8, 32))  # per head: one rank-one step (float32 noise aside)
    assert (sv[:, 0] > 0).all() and (sv[:, 1] < 1e-3 * sv[:, 0]).all(), sv[:, :2]
    assert torch.linalg.svdvals(qkv)[1] > 1e-2 * torch.linalg.svdvals(qkv)[0], "decay must be per head, not whole"


def test_torch_multihead_attention() -> None:
    mha = nn.MultiheadAttention(32, 4)
    groups = adams_dist.param_groups(mha)
    assert _decay_of(groups) == {"in_proj_weight": "spectral", "in_proj_bias": "scalar", "out_proj.weight": "spectral",
                                 "out_proj.bias": "scalar"}
    assert _heads(mha.in_proj_weight) == 12 and _heads(mha.out_proj.weight) == 1
    split = nn.MultiheadAttention(32, 4, kdim=16, vdim=16)
    adams_dist.param_groups(split)
    assert [_heads(w) for w in (split.q_proj_weight, split.k_proj_weight, split.v_proj_weight)] == [4, 4, 4]


def test_hf_gpt2_from_config() -> None:
    transformers = needs("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    groups = adams_dist.param_groups(model)
    decay = _decay_of(groups)
    assert decay["transformer.wte.weight"] == decay["transformer.wpe.weight"] == "scalar"
    assert not model.lm_head.weight.use_spectral_decay  # the tied head gets the embedding's scalar decay
    assert decay["transformer.h.0.attn.c_attn.weight"] == decay["transformer.h.0.mlp.c_fc.weight"] == "spectral"
    assert {decay[n] for n in decay if n.endswith("bias") or ".ln_" in n} == {"scalar"}
    # Conv1D stores (in, out): c_attn's (32, 96) holds q, k and v of 4 heads as 12 column blocks of 8; every
    # Conv1D matrix is the transpose, as nn.Linear would hold it (spectral decay's sqrt(M) counts outputs)
    block = model.transformer.h[0]
    assert SpectralShape.of(block.attn.c_attn.weight) == SpectralShape(12, 8, 32, columns=True)
    assert SpectralShape.of(block.mlp.c_fc.weight) == SpectralShape(1, 128, 32, columns=True)
    assert SpectralShape.of(block.attn.c_proj.weight) == SpectralShape(1, 32, 32, columns=True)
    assert "12 matrices of 8x32, the transposes of its column blocks" in str(groups)
    opt = adams_dist.Adams_ZeRO(groups, lr=1e-3)
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()  # the engine takes the marks as they are
    assert opt.state[block.attn.c_attn.weight]["u"].shape == (96,)  # per row of each head: 12 x 8


def test_hf_llama_from_config_heads_from_the_config() -> None:
    transformers = needs("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                                      num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config)
    groups = adams_dist.param_groups(model, weight_decay=WD, scalar_vector_weight_decay=SVWD)
    attn = model.model.layers[0].self_attn
    assert [_heads(attn.q_proj.weight), _heads(attn.k_proj.weight), _heads(attn.v_proj.weight)] == [8, 2, 2]
    decay = _decay_of(groups)
    assert decay["model.embed_tokens.weight"] == "scalar" and decay["model.norm.weight"] == "scalar"
    assert decay["model.layers.0.mlp.down_proj.weight"] == "spectral"
    assert [g["weight_decay"] for g in groups] == [WD, SVWD]
    adams_dist.Adams_ZeRO(groups, lr=1e-3)  # the engine takes the groups as they are


def test_groups_serve_the_other_rules_and_torch_optimizers() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    for make in (adams_dist.AdamW, torch.optim.AdamW):
        opt = make(adams_dist.param_groups(model, weight_decay=WD, scalar_vector_weight_decay=SVWD), lr=1e-3)
        assert [len(g["params"]) for g in opt.param_groups] == [1, 4]
        assert [g["weight_decay"] for g in opt.param_groups] == [WD, SVWD]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), True, "0.1"])
def test_bad_weight_decay_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        adams_dist.param_groups(nn.Linear(4, 4), weight_decay=bad)  # type: ignore[arg-type]
