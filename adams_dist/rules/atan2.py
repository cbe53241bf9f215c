"""atan2(y, x) for x >= 0: ``torch.atan2`` when eager, a short polynomial inside compiled kernels.

On CPU, inductor's vectorised ``atan2`` (SLEEF, 1 ulp) costs more than the rest of a fused Adam step
together: the step stops being memory-bound. This version is a handful of fused multiply-adds that
the compiler keeps inside the single pass over memory. It is not a different algorithm: it is
atan2 to within 2 ulp in float32 (tests/test_atan2.py measures it against float64), with the same
special values (signed zeros, +-pi/2 on the axis, NaN in, NaN out). float64 inputs take
``torch.atan2``, since the polynomial is only accurate to float32.

Method: reduce to z = y/x when |y| <= x, else z = x/y, so that |z| <= 1 and z carries y's sign;
evaluate the odd atan(z) = z + z*s*Q(s) with s = z^2 and Q a degree-7 near-minimax fit (relative
error 1.7e-8 in exact arithmetic); where |y| > x, reflect with +-pi/2 - atan(z). Every sign (a signed zero
included) comes from y through the division and the product, with no bit casts: inductor writes a bit
cast on CPU as a scalar loop through memory per vector, which cost 4x the whole loop on one host and kept
bf16 loops half a vector wide.
"""

from __future__ import annotations

import torch

from ..tracing import tracing


def atan2_nonneg(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.atan2(y, x)`` for ``x >= 0`` (a square root, in every caller)."""
    if y.dtype == torch.float64:
        return torch.atan2(y, x)
    swap = y.abs() > x
    num, den = torch.where(swap, x, y), torch.where(swap, y, x)
    z = torch.where(den == 0, num, num / den)  # atan2(+-0, 0) = +-0; NaN stays NaN (NaN == 0 is false)
    s = z * z
    # Q(s) by Horner, coefficients fitted by iteratively reweighted least squares. They are literals, not a
    # module-level tuple: torch.compile turns a float read from a global into a kernel input, which the
    # generated loop reloads and converts on every iteration (its vector stores may alias any pointer).
    q = s * 0.002920678228443761 - 0.016367874698921266
    q = q * s + 0.043211779325298155
    q = q * s - 0.07552207909094881
    q = q * s + 0.10666001949470279
    q = q * s - 0.14211054717300645
    q = q * s + 0.19993772776955562
    q = q * s - 0.33333152734402277
    r = torch.where(s == 0, z, z + z * s * q)  # -0 + 0 would be +0; z * (1 + s*q) loses ulps near |z| = 1
    return torch.where(swap, torch.where(y < 0, -1.5707963267948966, 1.5707963267948966) - r, r)


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """atan2 for rule functions (``x >= 0``): ``torch.atan2`` when eager, the polynomial while torch.compile
    traces (float64 keeps ``torch.atan2`` there too), so one rule function serves both paths."""
    if tracing():
        return atan2_nonneg(y, x)
    return torch.atan2(y, x)
