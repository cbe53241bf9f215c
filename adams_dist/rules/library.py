"""The rules this package ships: each element-wise rule is one function (rules/elementwise.py).

Each takes this step's scalars and returns the update of one tensor, which changes the state in place
and returns the step to add to the parameter (decay is the engine's, applied around it). ``exp_avg``
is m, ``exp_avg_sq`` is v; c1 = 1 - b1^t, c2 = 1 - b2^t. In-place ops on their own temporaries
(``.mul_`` on a fresh result) keep the eager paths from allocating more; compiled, they cost nothing.
"""

from __future__ import annotations

import math

import torch

from .atan2 import atan2
from .base import Rule, adam_moments, adam_moments_foreach, apply_decays
from .elementwise import ElementwiseRule


def atan2_rule(lr, step, betas, a=1.0, b=1.0, bias_correction_in_atan2=False):
    """p -= lr * k_out * a * atan2(m * k_in, b * sqrt(v / c2)); no epsilon.

    Bias correction 1 sits outside atan2 by default (k_out = 1/c1, the Adams and fused adam-atan2
    convention); ``bias_correction_in_atan2`` moves it inside (adam-atan2-pytorch). b = 0 makes the
    step sign descent.
    """
    beta1, beta2 = betas
    c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
    inside = bool(bias_correction_in_atan2)
    k_in, den_mul = 1.0 / c1, b / math.sqrt(c2)
    scale = -lr * a if inside else -lr * a / c1

    def update(g, exp_avg, exp_avg_sq):
        adam_moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        den = exp_avg_sq.sqrt().mul_(den_mul)
        return atan2(exp_avg * k_in if inside else exp_avg, den).mul_(scale)

    return update


def adamw_rule(lr, step, betas, eps):
    """p -= lr * m_hat / (sqrt(v_hat) + eps), computed as ``m * (-lr*sqrt(c2)/c1) / (sqrt(v) + eps*sqrt(c2))``."""
    beta1, beta2 = betas
    sqrt_c2 = math.sqrt(1.0 - beta2**step)
    eps_hat, scale = eps * sqrt_c2, -lr * sqrt_c2 / (1.0 - beta1**step)

    def update(g, exp_avg, exp_avg_sq):
        adam_moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        return (exp_avg * scale).div_(exp_avg_sq.sqrt().add_(eps_hat))

    return update


def srf_rule(lr, step, betas, eps):
    """AdamSRF (HomeAdam Algorithm 1): p -= lr * m_hat / (v_hat + eps), no square root.

    Computed as ``m * (-lr*c2/c1) / (v + eps*c2)``, without forming m_hat or v_hat.
    """
    beta1, beta2 = betas
    c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
    eps_c2, scale = eps * c2, -lr * c2 / c1

    def update(g, exp_avg, exp_avg_sq):
        adam_moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        return (exp_avg * scale).div_(exp_avg_sq + eps_c2)

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
        factor = (exp_avg_sq + eps_c2).reciprocal_().mul_(c2).masked_fill_(exp_avg_sq < tau_c2, 1.0)
        return factor.mul_(exp_avg).mul_(scale)

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
        wide = params[0].dtype if params else None
        narrow = bool(params) and exp_avgs[0].dtype != wide  # moment_dtype: compute in the master's dtype
        if narrow:
            exp_avgs, exp_avg_sqs = [m.to(wide) for m in exp_avgs], [v.to(wide) for v in exp_avg_sqs]
        adam_moments_foreach(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        if narrow:
            torch._foreach_copy_(state["exp_avg"], exp_avgs)
            torch._foreach_copy_(state["exp_avg_sq"], exp_avg_sqs)
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
            if srf_ok:  # AdamSRF's step, added into p by addcdiv_: one temporary instead of two
                p.addcdiv_(m, v + eps * b, value=-lr * b / a)
            else:
                p.add_(m, alpha=-lr / a)
        return True


HOMEADAM = HomeAdamRule()
