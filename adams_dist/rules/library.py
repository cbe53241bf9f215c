"""The rules this package ships: each element-wise rule is one function (rules/elementwise.py).

Each takes this step's scalars and returns the update of one tensor, which changes the state in place
and returns the step to add to the parameter (decay is the engine's, applied around it). ``exp_avg``
is m, ``exp_avg_sq`` is v; c1 = 1 - b1^t, c2 = 1 - b2^t.
"""

from __future__ import annotations

import math

import torch

from .atan2 import atan2
from .base import Rule, adam_moments, apply_decays
from .elementwise import ElementwiseRule, add_in_chunks


def atan2_rule(lr, step, betas, a=1.0, b=1.0, bias_correction_in_atan2=False):
    """p -= lr * k_out * a * atan2(m * k_in, b * sqrt(v / c2)); no epsilon.

    Bias correction 1 sits outside atan2 by default (k_out = 1/c1, the Adams and fused adam-atan2
    convention); ``bias_correction_in_atan2`` moves it inside (adam-atan2-pytorch). b = 0 makes the
    step sign descent.
    """
    beta1, beta2 = betas
    c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
    k_in, k_out = (1.0 / c1, 1.0) if bias_correction_in_atan2 else (1.0, 1.0 / c1)
    den_mul, scale = b / math.sqrt(c2), -lr * a * k_out

    def update(g, exp_avg, exp_avg_sq):
        adam_moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        return atan2(exp_avg * k_in, exp_avg_sq.sqrt() * den_mul) * scale

    return update


def adamw_rule(lr, step, betas, eps):
    """p -= lr * m_hat / (sqrt(v_hat) + eps)."""
    beta1, beta2 = betas
    inv_sqrt_c2, scale = 1.0 / math.sqrt(1.0 - beta2**step), -lr / (1.0 - beta1**step)

    def update(g, exp_avg, exp_avg_sq):
        adam_moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        return exp_avg / (exp_avg_sq.sqrt() * inv_sqrt_c2 + eps) * scale

    return update


def srf_step(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, eps_c2: float, scale: float) -> torch.Tensor:
    """-lr * m_hat / (v_hat + eps) as ``m / (v + eps*c2) * (-lr*c2/c1)``, without forming m_hat or v_hat."""
    return exp_avg / (exp_avg_sq + eps_c2) * scale


def srf_rule(lr, step, betas, eps):
    """AdamSRF (HomeAdam Algorithm 1): p -= lr * m_hat / (v_hat + eps), no square root."""
    beta1, beta2 = betas
    c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
    eps_c2, scale = eps * c2, -lr * c2 / c1

    def update(g, exp_avg, exp_avg_sq):
        adam_moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        return srf_step(exp_avg, exp_avg_sq, eps_c2, scale)

    return update


def homeadamew_rule(lr, step, betas, eps, tau):
    """HomeAdamEW (Algorithm 3): the HomeAdam switch made per element.

    p -= lr/c1 * m * factor, factor = c2 / (v + eps*c2) where v_hat >= tau, else 1 (momentum-SGD).
    """
    beta1, beta2 = betas
    c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
    eps_c2, tau_c2, scale = eps * c2, tau * c2, -lr / c1

    def update(g, exp_avg, exp_avg_sq):
        adam_moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        return exp_avg * torch.where(exp_avg_sq < tau_c2, 1.0, c2 / (exp_avg_sq + eps_c2)) * scale

    return update


ADAM_STATE = ("exp_avg", "exp_avg_sq")
ATAN2 = ElementwiseRule("atan2", atan2_rule, ADAM_STATE)
ADAMW = ElementwiseRule("adamw", adamw_rule, ADAM_STATE)
SRF = ElementwiseRule("srf", srf_rule, ADAM_STATE)
HOMEADAMEW = ElementwiseRule("homeadamew", homeadamew_rule, ADAM_STATE)


class HomeAdamRule(Rule):
    """HomeAdam (Algorithm 2): SRF step when min(v_hat) >= tau, else momentum-SGD (p -= lr * m_hat).

    Not element-wise: the min runs over every element of the whole param group on every rank, so one
    element with a zero gradient history sends the group to momentum-SGD; ``per_tensor=True`` decides
    per tensor.
    """

    name = "homeadam"
    state_names = ADAM_STATE
    hyperparams = ("betas", "eps", "tau", "per_tensor")
    required = ("betas", "eps", "tau")

    def apply(self, params, grads, state, steps, group, lr, reduce_min, decays, compiled=False, strict=False):
        apply_decays(params, decays)
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        for g, m, v in zip(grads, exp_avgs, exp_avg_sqs):
            adam_moments(g, m, v, beta1, beta2)
        c1, c2 = [1.0 - beta1**t for t in steps], [1.0 - beta2**t for t in steps]
        eps, tau = float(group["eps"]), float(group["tau"])
        inf = torch.tensor(math.inf, dtype=torch.float64)
        mins = [v.min().cpu().double() / b if v.numel() else inf for v, b in zip(exp_avg_sqs, c2)]  # min v_hat
        local_mins = torch.stack(mins) if mins else inf[None]
        if group.get("per_tensor", False):
            use_srf = (reduce_min(local_mins) >= tau).tolist()
        else:
            use_srf = [bool(reduce_min(local_mins.min().reshape(1)) >= tau)] * len(params)
        for p, m, v, a, b, srf_ok in zip(params, exp_avgs, exp_avg_sqs, c1, c2, use_srf):
            if srf_ok:
                add_in_chunks(p, (m, v), lambda m, v, a=a, b=b: srf_step(m, v, eps * b, -lr * b / a))
            else:
                p.add_(m, alpha=-lr / a)
        return True


HOMEADAM = HomeAdamRule()
