"""Checks of what users pass in: engine options, parameters, and each param group's hyperparameters.

Each raises TypeError or ValueError naming the offending value before anything is built.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import ablations, quant8
from .rules import KERNELS, Rule
from .rules.base import finite_real
from .rules.elementwise import ElementwiseRule
from .spectral import SpectralShape

ENGINE_KEYS = ("params", "param_names", "initial_lr")  # param-group entries that are not hyperparameters


MOMENT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def check_engine_options(master_dtype: Any, bucket_mb: Any, grad_comm_dtype: Any, max_grad_norm: Any,
                         kernel: str, collective_timeout: Any) -> str:
    """Validate the engine's options; returns the kernel choice (``ADAMS_DIST_KERNEL`` overrides "auto")."""
    if not (isinstance(collective_timeout, (int, float)) and not isinstance(collective_timeout, bool)
            and 0 < collective_timeout < float("inf")):
        raise ValueError(f"collective_timeout must be a finite number of seconds > 0, got {collective_timeout!r}")
    if master_dtype is not None and not (isinstance(master_dtype, torch.dtype) and master_dtype.is_floating_point):
        raise TypeError(f"master_dtype must be a floating torch.dtype or None (no master copy), got {master_dtype!r}")
    if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    if grad_comm_dtype is not None and not (
        isinstance(grad_comm_dtype, torch.dtype) and grad_comm_dtype.is_floating_point
    ):
        raise TypeError(f"grad_comm_dtype must be a floating torch.dtype or None, got {grad_comm_dtype!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    kernel = os.environ.get("ADAMS_DIST_KERNEL", kernel) if kernel == "auto" else kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def check_moment_dtype(moment_dtype: Any, master_dtype: torch.dtype, rule: Any) -> torch.dtype | str:
    """How the rule's moments are stored: ``master_dtype`` when None; bfloat16 stores half the bytes, "8bit"
    blockwise-quantized codes (adams_dist/quant8.py) a quarter."""
    if moment_dtype is None:
        return master_dtype
    if isinstance(moment_dtype, str) and moment_dtype == "8bit":
        # The engine dequantizes a few parameters at a time: the rule must be element-wise, its state (m, v)
        if not isinstance(rule, ElementwiseRule) or rule.state_names != tuple(quant8.CODE_DTYPES):
            why = "is not element-wise" if not isinstance(rule, ElementwiseRule) else \
                f"keeps the state {list(rule.state_names)}"
            raise ValueError(f"moment_dtype='8bit' needs an element-wise rule with the state (exp_avg, exp_avg_sq); "
                             f"the {rule.name} rule {why}")
        return moment_dtype
    if moment_dtype == torch.float16:
        raise ValueError(f"moment_dtype=torch.float16 cannot hold the {rule.name} rule's second moment: squared "
                         "gradients below 6e-8 flush to zero in float16; use torch.bfloat16 (float32's range)")
    if moment_dtype not in MOMENT_DTYPES:
        raise ValueError(f"moment_dtype must be one of {', '.join(map(str, MOMENT_DTYPES))}, '8bit' or None (the "
                         f"master dtype), got {moment_dtype!r}")
    return moment_dtype


def check_rounding_seed(seed: Any) -> int:
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"rounding_seed must be an int >= 0, got {seed!r}")
    return seed


def check_master_remainder(master_remainder: Any, master_dtype: Any) -> bool:
    if not isinstance(master_remainder, bool):
        raise TypeError(f"master_remainder must be True or False, got {master_remainder!r}")
    if master_remainder and master_dtype != torch.float32:
        raise ValueError("master_remainder=True keeps a float32 master as the bf16 parameter plus a 16-bit "
                         f"remainder: it needs master_dtype=torch.float32 (the default), got {master_dtype}")
    return master_remainder


def check_bf16_params(params: list[torch.Tensor], option: str) -> None:
    """``master_dtype=None`` and ``master_remainder=True`` keep the master in the bf16 parameters themselves."""
    for i, p in enumerate(params):
        if p.dtype != torch.bfloat16:
            raise ValueError(f"{option} keeps the master in bfloat16 parameters; parameter #{i} is {p.dtype}"
                             + (", which is its own master already: leave the default"
                                if p.dtype in (torch.float32, torch.float64) else ""))


def check_params(params: list[Any], groups: list[dict[str, Any]], device: torch.device | None) -> torch.device | None:
    """Every entry a floating tensor (or a (name, tensor) pair), listed once across all groups, on one device.
    Returns that device."""
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    seen = {id(p) for g in groups for p in g["params"]}
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter #{i} of the group is a {type(p).__name__}, not a Tensor")
        if not p.is_floating_point():
            raise TypeError(f"parameter #{i} of the group has dtype {p.dtype}; only floating-point "
                            "parameters can be optimized")
        if id(p) in seen:
            raise ValueError(f"parameter #{i} of the group (shape {tuple(p.shape)}) is listed twice; "
                             "each tensor may appear once across all param groups")
        seen.add(id(p))
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(f"parameter #{i} of the group is on {p.device} but earlier parameters are on "
                             f"{device}; all parameters must be on one device")
    return device


def check_group(group: dict[str, Any], rule: Rule, ablations_supported: bool) -> None:
    """Validate one group's hyperparameters in place (betas become a pair of floats). Each must be a
    finite real number (not a bool): an infinite lr or ``lr=True`` would otherwise train silently wrong."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must have one element, got shape {tuple(lr.shape)}")
    value = finite_real(lr, tensor_ok=True)
    if value is None or value < 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    pair = [finite_real(beta, tensor_ok=True) for beta in betas]
    for i, beta in enumerate(pair):
        if beta is None or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]!r} (must be a number in [0, 1))")
    group["betas"] = (pair[0], pair[1])
    ablations.validate_group(group, supported=ablations_supported)
    for key in ("weight_decay", "scalar_vector_weight_decay"):
        if key in group and not ((v := finite_real(group[key])) is not None and v >= 0.0):
            raise ValueError(f"Invalid {key} value: {group[key]!r} (must be a finite number >= 0)")
    rule.validate(group)


def fingerprint(opt: Any, group_indices: list[int]) -> list[str]:
    """What every rank must have built alike: engine options, then per group its hyperparameters and per
    parameter its name (or position), shape, dtype and spectral view. Ranks compare it at construction."""
    lines = [f"{type(opt).__name__} rule={opt.rule.name} master={opt.master_dtype} "
             f"overlap={opt.overlap} comm={opt.grad_comm_dtype} bucket_mb={opt.bucket_mb} "
             f"max_grad_norm={opt.max_grad_norm} skip_nonfinite={opt.skip_nonfinite}"]
    for gi in group_indices:
        group = opt.param_groups[gi]
        hyper = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k not in ENGINE_KEYS}
        lines.append(f"group {gi}: {sorted(hyper.items())}")
        names = group.get("param_names") or [None] * len(group["params"])
        for j, (p, name) in enumerate(zip(group["params"], names)):
            shape = SpectralShape.of(p) if opt.uses_spectral_decay else None
            lines.append(f"group {gi} param {name or f'#{j}'}: shape {tuple(p.shape)}, dtype {p.dtype}, "
                         f"spectral {shape}")
    return lines
