"""An independent float64 reference for every adams_dist update rule.

Written from the math in docs/api.md and the design notes, not from the package: a plain loop over
parameters, one element-wise formula per rule (``FORMULAS``: rule name -> function), everything in
float64. It is deliberately slow and obvious. Tests drive it like an optimizer:

    ref = Reference("adams", [dict(params=[w, b], lr=1e-2), dict(params=[(x, {"heads": 3})])])
    ref.step([gw, gb, gx])   # one gradient per parameter in order; None skips that parameter
    ref.params               # list of float64 tensors, same order

A parameter entry is a tensor or ``(tensor, {"heads": n, "spectral": bool})``. Hyperparameters
live in ``ref.groups[i]`` and are read at every step, so a test can copy a scheduler's lr/betas
into them between steps.

Rules and conventions (t = steps this parameter actually took; params with grad None are skipped
entirely: no step count, no decay, no moment update):

    m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g^2 ; c1 = 1-b1^t ; c2 = 1-b2^t
    m_hat = m/c1 ; v_hat = v/c2

    adams      decay (below), then p -= lr/c1 * atan2(m, sqrt(v/c2))
    adamatan2  p *= 1-lr*wd ; p -= lr*k_out*a*atan2(k_in*m, b*sqrt(v/c2)),
               (k_in, k_out) = (1, 1/c1), or (1/c1, 1) with bias_correction_in_atan2
    adamw      p *= 1-lr*wd ; p -= lr*m_hat/(sqrt(v_hat)+eps)
    adamsrf    p *= 1-lr*wd ; p -= lr*m_hat/(v_hat+eps)
    homeadam   p *= 1-lr*wd ; if min(v_hat) >= tau over the group's stepping params (or per
               tensor with per_tensor=True): SRF step, else p -= lr*m_hat
    homeadamew p *= 1-lr*wd ; p -= lr*where(v_hat >= tau, m_hat/(v_hat+eps), m_hat)

Adams decay (reads the weights before this step's update):
    eligible matrix (ndim >= 2, last two dims != 1, spectral not False; leading dims / heads are
    batch): x = W^T u ; v = x/|x| ; w = W v ; u <- w/|w| ; s = <u, w> ;
    W -= lr*wd*sqrt(M)*s*u v^T. u is persistent, starts at ones. When W v is exactly zero (a zero
    matrix) u is kept as it is and no decay happens (the adams-torch quirk would set u to zero
    forever).
    everything else: p *= 1 - lr*scalar_vector_weight_decay  (also when weight_decay == 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

F64 = torch.float64

DEFAULTS: dict[str, dict[str, Any]] = {
    "adams": dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, scalar_vector_weight_decay=0.1),
    "adamatan2": dict(
        lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, a=1.0, b=1.0, bias_correction_in_atan2=False
    ),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "adamsrf": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "homeadam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, tau=1e-6, weight_decay=0.0, per_tensor=False),
    "homeadamew": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, tau=1e-6, weight_decay=0.0),
}

RULES = tuple(DEFAULTS)


def _f(x: Any) -> float:
    """Hyperparameters may be 1-element tensors (lr); the reference wants plain floats."""
    if isinstance(x, torch.Tensor):
        return float(x.item())
    return float(x)


# ---------------------------------------------------------------- the update formulas
# One function per rule: the update u of ``p -= lr * u`` from the raw moments m, v, the bias
# corrections c1 = 1-b1^t, c2 = 1-b2^t, the group's hyperparameters and, for homeadam, the group's
# decision (True: the SRF step). Decay is applied before, by Reference._step_group.
Formula = Callable[[torch.Tensor, torch.Tensor, float, float, dict[str, Any], "bool | None"], torch.Tensor]


def _adams(m, v, c1, c2, hp, srf):
    return torch.atan2(m, torch.sqrt(v / c2)) / c1


def _adamatan2(m, v, c1, c2, hp, srf):
    a, b = _f(hp["a"]), _f(hp["b"])
    if hp.get("bias_correction_in_atan2", False):
        return a * torch.atan2(m / c1, b * torch.sqrt(v / c2))
    return a / c1 * torch.atan2(m, b * torch.sqrt(v / c2))


def _adamw(m, v, c1, c2, hp, srf):
    return (m / c1) / (torch.sqrt(v / c2) + _f(hp["eps"]))


def _adamsrf(m, v, c1, c2, hp, srf):
    return (m / c1) / (v / c2 + _f(hp["eps"]))


def _homeadam(m, v, c1, c2, hp, srf):
    return _adamsrf(m, v, c1, c2, hp, srf) if srf else m / c1


def _homeadamew(m, v, c1, c2, hp, srf):
    return torch.where(v / c2 >= _f(hp["tau"]), _adamsrf(m, v, c1, c2, hp, srf), m / c1)


FORMULAS: dict[str, Formula] = {
    "adams": _adams,
    "adamatan2": _adamatan2,
    "adamw": _adamw,
    "adamsrf": _adamsrf,
    "homeadam": _homeadam,
    "homeadamew": _homeadamew,
}
assert set(FORMULAS) == set(DEFAULTS)


def dynamic_table64(signed: bool) -> torch.Tensor:
    """The code values of adams_dist/quant8.py, ascending, from their definition: magnitude bits (7 signed,
    8 unsigned) with z leading zeros, a 1, then f = bits - 1 - z fraction bits stand for
    10**-z * (0.1 + 0.9 * j / 2**f), j = 1 .. 2**f; all zeros for 0. Signed: those magnitudes and their
    negatives. Each value is stored as float32."""
    bits = 7 if signed else 8
    mags = sorted(10.0 ** -z * (0.1 + 0.9 * j / 2 ** (bits - 1 - z))
                  for z in range(bits) for j in range(1, 2 ** (bits - 1 - z) + 1))
    values = [-x for x in reversed(mags)] + [0.0] + mags if signed else [0.0] + mags
    return torch.tensor(values, dtype=torch.float32).to(F64)


def codes64(x: torch.Tensor, signed: bool, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 model of adams_dist/quant8.py's encoder: per block of ``block`` elements of flat ``x`` (the
    last one short), the float32 scale absmax(y) and each element's code: the sign of y times the index of
    the magnitude nearest |y| / scale (a tie: the smaller magnitude). y is x (signed) or sqrt(x)."""
    mags = dynamic_table64(signed)[127:] if signed else dynamic_table64(signed)
    flat = x.detach().to(F64).reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.long)
    scales = torch.empty(-(-flat.numel() // block), dtype=F64)
    for lo in range(0, flat.numel(), block):
        b = flat[lo: lo + block] if signed else flat[lo: lo + block].sqrt()
        scale = float(torch.tensor(float(b.abs().max()), dtype=torch.float32))
        y = b / scale if scale > 0 else torch.zeros_like(b)
        mag = (y.abs()[:, None] - mags[None, :]).abs().argmin(dim=1)
        codes[lo: lo + block] = torch.where(y < 0, -mag, mag)
        scales[lo // block] = scale
    return codes, scales


def quantized64(x: torch.Tensor, signed: bool, block: int = 256) -> torch.Tensor:
    """Float64 model of adams_dist/quant8.py: what ``x`` reads back as after 8-bit blockwise storage,
    ``table[code] * scale`` (signed) or its square (unsigned: v is coded in the sqrt domain)."""
    codes, scales = codes64(x, signed, block)
    table = dynamic_table64(signed)
    out = table[codes + (127 if signed else 0)] * scales.repeat_interleave(block)[: codes.numel()]
    return (out if signed else out.square()).view(x.shape)


class _P:
    """One parameter of the reference: float64 value, moments, step count, spectral state."""

    def __init__(self, value: torch.Tensor, heads: int | None, spectral: bool | None, heads_dim: int = 0):
        self.value = value.detach().to(dtype=F64, device="cpu").clone()
        self.orig_shape = tuple(value.shape)
        self.m = torch.zeros_like(self.value)
        self.v = torch.zeros_like(self.value)
        self.t = 0
        shape = self.orig_shape
        # column heads: a (N, heads*M) weight holds the transposes of (M, N) matrices
        self.heads_dim = heads_dim if heads is not None and heads > 1 else 0
        if self.heads_dim == 1:
            assert len(shape) == 2 and shape[1] % heads == 0, "column heads need a 2-D (N, heads*M) weight"
            shape = (heads, shape[1] // heads, shape[0])
        elif heads is not None and heads > 1:
            assert len(shape) == 2 and shape[0] % heads == 0, "heads need a 2-D (heads*M, N) weight"
            shape = (heads, shape[0] // heads, shape[1])
        self.mat_shape = shape
        self.spectral = (
            spectral is not False and len(shape) >= 2 and shape[-1] != 1 and shape[-2] != 1
        )
        if self.spectral:
            self.u = torch.ones(shape[:-1], dtype=F64)
            self.sigma = torch.zeros(shape[:-2], dtype=F64)
        else:
            self.u = None
            self.sigma = None


class Reference:
    """A float64, one-parameter-at-a-time implementation of every adams_dist rule."""

    def __init__(self, rule: str, params: Sequence[Any], moment_dtype: torch.dtype | str | None = None,
                 **defaults: Any):
        rule = rule.lower().replace("-", "").replace("_", "")
        if rule == "adamszero":
            rule = "adams"
        if rule not in DEFAULTS:
            raise ValueError(f"unknown rule {rule!r}; valid: {RULES}")
        self.rule = rule
        self.moment_dtype = moment_dtype  # m and v stored rounded to this dtype after each step (None: float64)
        self.defaults = {**DEFAULTS[rule], **defaults}
        params = list(params)
        if not params or not isinstance(params[0], dict):
            params = [dict(params=params)]
        self.groups: list[dict[str, Any]] = []
        self._ps: list[_P] = []
        # Decisions taken by homeadam (group, step, adaptive?, margin) and the smallest relative
        # distance |v_hat/tau - 1| seen by homeadamew; tests use them to check that a fp32
        # implementation cannot flip a decision through rounding.
        self.decisions: list[tuple[int, int, bool, float]] = []
        self.ew_margin = math.inf
        self.n_steps = 0
        for g in params:
            self.add_param_group(g)

    def add_param_group(self, group: dict[str, Any]) -> None:
        group = dict(group)
        entries = group.pop("params")
        if isinstance(entries, torch.Tensor):
            entries = [entries]
        ps = []
        for e in entries:
            meta: dict[str, Any] = {}
            if isinstance(e, tuple):
                e, meta = e
            ps.append(_P(e, meta.get("heads"), meta.get("spectral", getattr(e, "use_spectral_decay", None)),
                         meta.get("heads_dim", 0)))
        full = {**self.defaults, **group}
        full["_ps"] = ps
        self.groups.append(full)
        self._ps.extend(ps)

    # ---------------------------------------------------------------- accessors
    @property
    def params(self) -> list[torch.Tensor]:
        return [p.value for p in self._ps]

    @property
    def sigmas(self) -> list[torch.Tensor | None]:
        return [p.sigma for p in self._ps]

    @property
    def steps(self) -> list[int]:
        return [p.t for p in self._ps]

    # ---------------------------------------------------------------- the step
    def step(self, grads: Sequence[torch.Tensor | None]) -> None:
        grads = list(grads)
        if len(grads) != len(self._ps):
            raise ValueError(f"expected {len(self._ps)} gradients, got {len(grads)}")
        self.n_steps += 1
        i = 0
        for gi, group in enumerate(self.groups):
            ps = group["_ps"]
            gs = grads[i : i + len(ps)]
            i += len(ps)
            live = [(p, g.detach().to(dtype=F64, device="cpu").reshape(p.orig_shape))
                    for p, g in zip(ps, gs) if g is not None]
            if live:
                self._step_group(gi, group, live)

    def _step_group(self, gi: int, group: dict[str, Any], live: list[tuple[_P, torch.Tensor]]) -> None:
        lr = _f(group["lr"])
        b1, b2 = (_f(b) for b in group["betas"])
        wd = _f(group["weight_decay"])

        # 1. moments and bias corrections (never depend on the weights)
        hats = []
        for p, g in live:
            p.t += 1
            p.m = b1 * p.m + (1.0 - b1) * g
            p.v = b2 * p.v + (1.0 - b2) * g * g
            c1 = 1.0 - b1 ** p.t
            c2 = 1.0 - b2 ** p.t
            hats.append((c1, c2))

        # 2. homeadam's decision, taken once for the group (or per tensor)
        adaptive: list[bool] = []
        if self.rule == "homeadam":
            tau = _f(group["tau"])
            mins = [float((p.v / c2).min()) if p.v.numel() else math.inf for (p, _), (_, c2) in zip(live, hats)]
            if group.get("per_tensor", False):
                adaptive = [mn >= tau for mn in mins]
                for mn in mins:
                    self.decisions.append((gi, self.n_steps, mn >= tau, abs(mn / tau - 1.0)))
            else:
                mn = min(mins)
                adaptive = [mn >= tau] * len(live)
                self.decisions.append((gi, self.n_steps, mn >= tau, abs(mn / tau - 1.0)))

        # 3. decay (on the weights before this step's update), then the rule's update
        formula = FORMULAS[self.rule]
        for k, ((p, _g), (c1, c2)) in enumerate(zip(live, hats)):
            if self.rule == "adams":
                if p.spectral:
                    self._spectral(p, lr * wd)
                else:
                    p.value.mul_(1.0 - lr * _f(group["scalar_vector_weight_decay"]))
            else:
                p.value.mul_(1.0 - lr * wd)
            if self.rule == "homeadamew" and p.v.numel():
                self.ew_margin = min(self.ew_margin, float((p.v / c2 / _f(group["tau"]) - 1.0).abs().min()))
            p.value.sub_(lr * formula(p.m, p.v, c1, c2, group, adaptive[k] if adaptive else None))
        if self.moment_dtype == "8bit":  # stored as blockwise 8-bit codes (one process: blocks over the whole param)
            for p, _g in live:
                p.m, p.v = quantized64(p.m, signed=True), quantized64(p.v, signed=False)
        elif self.moment_dtype is not None:  # the step used the exact moments; storage rounds them (to nearest)
            for p, _g in live:
                p.m, p.v = p.m.to(self.moment_dtype).to(F64), p.v.to(self.moment_dtype).to(F64)

    @staticmethod
    def _spectral(p: _P, scale: float) -> None:
        """One power iteration with persistent u, then W -= scale*sqrt(M)*s*u v^T (per head)."""
        if p.heads_dim == 1:  # (N, heads*M) -> (heads, M, N), still a view
            W = p.value.view(p.orig_shape[0], p.mat_shape[0], p.mat_shape[1]).permute(1, 2, 0)
        else:
            W = p.value.view(p.mat_shape)  # (..., M, N); a view, so the update lands in p.value
        M = W.shape[-2]
        x = torch.einsum("...mn,...m->...n", W, p.u)
        xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        vv = torch.where(xn > 0, x / torch.where(xn > 0, xn, 1.0), 0.0)
        w = torch.einsum("...mn,...n->...m", W, vv)
        wn = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        # a head whose W v is exactly zero keeps its u (no decay happens there anyway)
        p.u = torch.where(wn > 0, w / torch.where(wn > 0, wn, 1.0), p.u)
        s = torch.where(wn[..., 0] > 0, (p.u * w).sum(-1), 0.0)
        p.sigma = s.clone()
        W.sub_(scale * math.sqrt(M) * s[..., None, None] * p.u[..., :, None] * vv[..., None, :])


def trajectory(rule: str, params: Sequence[Any], grads_seq: Sequence[Sequence[torch.Tensor | None]],
               **hp: Any) -> list[list[torch.Tensor]]:
    """Run `rule` from `params` over `grads_seq`; return the params (float64) after every step."""
    ref = Reference(rule, params, **hp)
    out = []
    for grads in grads_seq:
        ref.step(grads)
        out.append([p.clone() for p in ref.params])
    return out
