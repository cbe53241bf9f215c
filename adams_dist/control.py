"""The step's one small SUM all-reduce, as an object with named fields.

Every rank contributes its partial of each field; after ``wait()`` every field holds the sum
over the ranks. Fields travel in one flat fp32 vector, so a step pays one collective's latency
for all of them, however many matrices get spectral decay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Control:
    """``grad_norm_sq``: squared global gradient norm (filled in only when clipping or skipping needs it);
    ``has_grad``: per slot, how many ranks had a gradient; ``wtu``: per spectral slot index, the
    ``(heads, cols)`` partial ``W^T u`` of this rank's rows."""

    def __init__(self, has_grad: torch.Tensor, wtu: dict[int, torch.Tensor]):
        self.grad_norm_sq = has_grad.new_zeros(1)
        self.has_grad = has_grad
        self.wtu = wtu
        self._vector: torch.Tensor | None = None
        self._work: Any = None

    def _fields(self) -> list[torch.Tensor]:
        return [self.grad_norm_sq, self.has_grad, *self.wtu.values()]

    def start(self, all_reduce: Callable[[torch.Tensor], Any]) -> None:
        """Pack the fields and start ``all_reduce`` on them (it returns a handle with ``wait()``)."""
        self._vector = torch.cat([f.reshape(-1).float() for f in self._fields()])
        self._work = all_reduce(self._vector)

    def wait(self) -> None:
        """Wait for the sum and point every field at its part of it."""
        assert self._vector is not None, "Control.wait() before start()"
        self._work.wait()
        fields = self._fields()
        parts = torch.split(self._vector, [f.numel() for f in fields])
        self.grad_norm_sq, self.has_grad, *wtu = [p.view(f.shape) for p, f in zip(parts, fields)]
        self.wtu = dict(zip(self.wtu, wtu))

    def active(self) -> list[bool]:
        """Per slot: did any rank have a gradient (a param without one anywhere is not stepped)."""
        return (self.has_grad > 0).tolist()
