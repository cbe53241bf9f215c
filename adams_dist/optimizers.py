"""The named optimizers: each is the shared engine with one rule and its published defaults."""

from __future__ import annotations

from typing import Any

import torch

from . import rules
from .optimizer import ShardedOptimizer
from .rules.base import finite_real


class Adams_ZeRO(ShardedOptimizer):  # noqa: N801 - name kept from the reference package
    """Adams: atan2 Adam without epsilon, spectral decay on matrices, scalar decay on the rest.

    Arguments, their order and defaults follow adams-torch 0.0.1 (``params, master_dtype, process_group,
    lr, betas, weight_decay, scalar_vector_weight_decay``); pass them by keyword to be safe.
    Unlike the reference, scalar/vector decay also applies when ``weight_decay == 0``.
    """

    rule = rules.get("atan2")
    uses_spectral_decay = True

    def __init__(self, params: Any, master_dtype: torch.dtype = torch.float32, process_group: Any | None = None,
                 lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.1, scalar_vector_weight_decay: float = 0.1, **engine: Any):
        for name, value in (("master_dtype", master_dtype), ("process_group", process_group)):
            if not isinstance(value, torch.dtype) and finite_real(value, tensor_ok=True) is not None:
                # Adams_ZeRO(params, 1e-3): other optimizers take lr second, adams-torch (and we) do not
                raise TypeError(f"Adams_ZeRO got {value!r} as {name}, which looks like a learning rate: pass it as "
                                f"lr={value!r}. The positional order is adams-torch's: (params, master_dtype, "
                                "process_group, lr, betas, weight_decay, scalar_vector_weight_decay)")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay,
                        scalar_vector_weight_decay=scalar_vector_weight_decay)
        super().__init__(params, defaults, master_dtype=master_dtype, process_group=process_group, **engine)


Adams = Adams_ZeRO


class AdamATan2(ShardedOptimizer):
    """Adam with atan2 instead of division by ``sqrt(v) + eps``, and decoupled decay ``p *= 1 - lr*wd``.

    Defaults follow the fused CUDA adam-atan2 package (bias correction 1 outside atan2, a = b = 1).
    adam-atan2-pytorch is ``a=1.27, betas=(0.9, 0.99), bias_correction_in_atan2=True``.
    ``second_moment``, ``rotate`` and ``rotation_seed`` are single-process research ablations
    (adams_dist/ablations.py). Positional: ``params, lr, betas, weight_decay`` as in both packages; the
    rest is keyword-only (adam-atan2-pytorch's fifth positional argument is ``regen_reg_rate``, not ``a``).
    """

    rule = rules.get("atan2")

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.01, *, a: float = 1.0, b: float = 1.0,
                 bias_correction_in_atan2: bool = False, second_moment: str = "element", rotate: bool = False,
                 rotation_seed: int = 0, **engine: Any):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, a=a, b=b,
                        bias_correction_in_atan2=bias_correction_in_atan2,
                        second_moment=second_moment, rotate=rotate, rotation_seed=rotation_seed)
        super().__init__(params, defaults, **engine)


class AdamW(ShardedOptimizer):
    """AdamW (decoupled decay), sharded like every optimizer here.

    ``second_moment``, ``rotate`` and ``rotation_seed`` are single-process research ablations
    (adams_dist/ablations.py). Positional: ``params, lr, betas, eps, weight_decay`` as in torch.optim.AdamW;
    the rest is keyword-only (torch's sixth positional argument is ``amsgrad``).
    """

    rule = rules.get("adamw")

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, second_moment: str = "element",
                 rotate: bool = False, rotation_seed: int = 0, **engine: Any):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        second_moment=second_moment, rotate=rotate, rotation_seed=rotation_seed)
        super().__init__(params, defaults, **engine)


class AdamSRF(ShardedOptimizer):
    """AdamSRF (HomeAdam paper, Algorithm 1): ``m_hat / (v_hat + eps)``, no square root.

    Positional order as in the homeadam package: ``params, lr, betas, eps, weight_decay``.
    """

    rule = rules.get("srf")

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **engine: Any):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **engine)


class HomeAdam(ShardedOptimizer):
    """HomeAdam (Algorithm 2): AdamSRF while ``min(v_hat) >= tau`` over the whole group, else momentum-SGD.

    Positional order as in the homeadam package: ``params, lr, betas, eps, weight_decay, tau``.
    """

    rule = rules.get("homeadam")

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, tau: float = 1e-6, *, per_tensor: bool = False,
                 **engine: Any):
        defaults = dict(lr=lr, betas=betas, eps=eps, tau=tau, weight_decay=weight_decay, per_tensor=per_tensor)
        super().__init__(params, defaults, **engine)


class HomeAdamEW(ShardedOptimizer):
    """HomeAdamEW (Algorithm 3): the HomeAdam switch decided per element.

    Positional order as in the homeadam package: ``params, lr, betas, eps, weight_decay, tau``.
    """

    rule = rules.get("homeadamew")

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, tau: float = 1e-6, **engine: Any):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, tau=tau, weight_decay=weight_decay), **engine)


OPTIMIZERS: dict[str, type[ShardedOptimizer]] = {
    "adams": Adams_ZeRO,
    "adamatan2": AdamATan2,
    "adamw": AdamW,
    "adamsrf": AdamSRF,
    "homeadam": HomeAdam,
    "homeadamew": HomeAdamEW,
}


BUILTIN = frozenset(OPTIMIZERS)  # the names create_optimizer knows before any register_optimizer


def _key(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    return "adams" if key == "adamszero" else key


def register_optimizer(name: str, cls: type[ShardedOptimizer]) -> type[ShardedOptimizer]:
    """Make ``create_optimizer(name, ...)`` build ``cls`` (a ``ShardedOptimizer`` subclass, usually with a rule
    from ``rules.register``); returns ``cls``. Registering a name again replaces it; built-in names are kept."""
    key = _key(name)
    if key in BUILTIN and OPTIMIZERS[key] is not cls:
        raise ValueError(f"{name!r} is a built-in optimizer; register yours under another name")
    if not (isinstance(cls, type) and issubclass(cls, ShardedOptimizer)):
        raise TypeError(f"register_optimizer needs a ShardedOptimizer subclass, got {cls!r}")
    OPTIMIZERS[key] = cls
    return cls


def create_optimizer(name: str, params: Any, **hparams: Any) -> ShardedOptimizer:
    """Build an optimizer by name (case-insensitive; '-' and '_' ignored), e.g. ``"adams"`` or ``"AdamW"``."""
    key = _key(name)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key](params, **hparams)
