"""Parameter groups for any ``nn.Module``, sorted the way the Adams rule expects.

Spectral decay goes on the weight matrices of linear and conv layers only. Embeddings (and weights
tied to them), norms, biases and every other parameter get the scalar decay. Fused attention
projections are marked per head (``set_heads``) where the module makes the heads knowable. Every
decision is kept, with its reason, for the user to print and check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .spectral import _HEADS_ATTR, SpectralShape, set_heads

# Layers whose ``weight`` is a matrix (or a batch of them) that spectral decay is meant for. HF's
# Conv1D is matched by name so that transformers need not be installed.
_MATRIX_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                               nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Decision:
    """Where one parameter went, and why."""

    name: str
    shape: tuple[int, ...]
    decay: str  # "spectral" or "scalar"
    reason: str

    def row(self, width: int) -> str:
        return f"{self.name:<{width}}  {str(self.shape):<14}  {self.decay:<8}  {self.reason}"


class ParamGroups(list):  # type: ignore[type-arg]
    """The groups, a list of dicts any torch optimizer takes, with the decision for every parameter
    in ``decisions``; ``str()`` prints them as a table."""

    def __init__(self, groups: list[dict[str, Any]], decisions: list[Decision]):
        super().__init__(groups)
        self.decisions = decisions

    def __str__(self) -> str:
        width = max([len("parameter"), *(len(d.name) for d in self.decisions)])
        head = f"{'parameter':<{width}}  {'shape':<14}  {'decay':<8}  why"
        return "\n".join([head, *(d.row(width) for d in self.decisions)])


def param_groups(model: nn.Module, *, lr: float | None = None, weight_decay: float = 0.1,
                 scalar_vector_weight_decay: float = 0.1) -> ParamGroups:
    """Two groups for ``model``: weight matrices of linear and conv layers (``weight_decay``: spectral
    for Adams, plain for the other rules), and everything else (``scalar_vector_weight_decay``).

    Marks the model's parameters as the engine reads them: ``use_spectral_decay = False`` on matrices
    that get the scalar decay (embeddings, tied weights, unknown matrices) and ``set_heads`` on fused
    attention projections (torch ``MultiheadAttention``; ``q_proj``/``k_proj``/``v_proj`` of modules
    with a ``head_dim``, as in HF Llama; GPT-2's ``c_attn`` by column blocks). HF ``Conv1D`` weights are
    stored ``(in, out)``: their matrices are the transposes, as ``nn.Linear`` would hold them. Call it
    before creating the optimizer, and again on a copy of the model (marks are attributes and do not
    survive ``deepcopy``).
    """
    for value, what in ((weight_decay, "weight_decay"), (scalar_vector_weight_decay, "scalar_vector_weight_decay")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    _mark_attention_heads(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    reasons: dict[int, str] = {}  # matrix parameters that get spectral decay -> why
    for module_name, module in model.named_modules():
        for p, kind in _matrices_of(module):
            if id(p) not in embeddings:
                reasons[id(p)] = f"{kind} ({type(module).__name__} {module_name or 'model'})"
    spectral: list[tuple[str, torch.Tensor]] = []
    scalar: list[tuple[str, torch.Tensor]] = []
    decisions = []
    for name, p in model.named_parameters():
        why, shape = reasons.get(id(p)), SpectralShape.of(p)
        if why is not None and shape is not None:
            spectral.append((name, p))
            decisions.append(Decision(name, tuple(p.shape), "spectral", why + _heads(shape)))
            continue
        if p.ndim >= 2:
            p.use_spectral_decay = False  # type: ignore[attr-defined]
        scalar.append((name, p))
        decisions.append(Decision(name, tuple(p.shape), "scalar", _scalar_reason(p, embeddings, why)))
    extra = {} if lr is None else {"lr": lr}
    groups = [{"params": spectral, "weight_decay": weight_decay, **extra},
              {"params": scalar, "weight_decay": scalar_vector_weight_decay,
               "scalar_vector_weight_decay": scalar_vector_weight_decay, **extra}]
    return ParamGroups([g for g in groups if g["params"]], decisions)


def _matrices_of(module: nn.Module) -> list[tuple[torch.Tensor, str]]:
    """The module's own matrix parameters meant for spectral decay, heads marked where knowable."""
    if isinstance(module, nn.MultiheadAttention):
        h = module.num_heads
        if module.in_proj_weight is not None:  # q, k and v stacked: 3 * num_heads heads
            return [(_mark_heads(module.in_proj_weight, 3 * h), f"q/k/v projection, 3x{h} heads")]
        return [(_mark_heads(w, h), f"{n} projection, {h} heads") for n, w in
                (("q", module.q_proj_weight), ("k", module.k_proj_weight), ("v", module.v_proj_weight))]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    if type(module).__name__ == "Conv1D":  # HF GPT-2: weight (in, out); the matrix is its transpose
        if getattr(weight, _HEADS_ATTR, None) is None:
            set_heads(weight, 1, dim=1)
        return [(weight, "weight stored (in, out)")]
    return [(weight, "layer weight")] if isinstance(module, _MATRIX_LAYERS) else []
    return []


def _mark_attention_heads(model: nn.Module) -> None:
    """``set_heads`` on q/k/v projections of attention modules that state their ``head_dim``: HF Llama,
    Mistral, Qwen and the like (``q_proj`` gets ``num_heads`` heads, ``k_proj``/``v_proj`` the key-value
    heads) and HF GPT-2 (``c_attn``, a ``Conv1D`` whose q, k and v heads are column blocks)."""
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):
            continue
        for proj in ("q_proj", "k_proj", "v_proj", "c_attn", "q_attn"):
            layer = getattr(module, proj, None)
            if isinstance(layer, nn.Linear) and layer.out_features % head_dim == 0:
                _mark_heads(layer.weight, layer.out_features // head_dim)
            elif type(layer).__name__ == "Conv1D":
                weight = layer.weight  # type: ignore[union-attr]
                if weight.shape[1] % head_dim == 0:
                    _mark_heads(weight, weight.shape[1] // head_dim, dim=1)


def _mark_heads(w: torch.Tensor, n_heads: int, dim: int = 0) -> torch.Tensor:
    return set_heads(w, n_heads, dim) if n_heads > 1 and w.shape[dim] // n_heads >= 2 else w


def _heads(shape: SpectralShape) -> str:
    blocks = ", the transposes of its column blocks" if shape.columns else ""
    if shape.heads > 1:
        return f"; {shape.heads} matrices of {shape.rows}x{shape.cols}{blocks}"
    return f"; the {shape.rows}x{shape.cols} transpose" if shape.columns else ""


def _scalar_reason(p: torch.Tensor, embeddings: set[int], matrix_reason: str | None) -> str:
    if id(p) in embeddings:
        return "embedding (or tied to one)"
    if matrix_reason is not None:
        return "matrix with a dimension of 1"
    if p.ndim >= 2:
        return "matrix outside linear/conv layers"
    return "bias, norm or other vector" if p.ndim == 1 else "scalar"
