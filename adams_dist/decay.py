"""Decoupled weight decay, planned per tensor before its update.

Scalar decay is ``p <- keep * p``. Spectral decay is the rank-1 ``W -= coef * (W v) v^T`` whose
pieces come from one power step on this rank's rows (``spectral.power_rows``). Rules with a
compiled kernel fold a Decay into their single pass over memory; every other path calls ``apply_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import spectral


@dataclass
class Decay:
    """Decoupled weight decay of one tensor, due before its update.

    ``p <- keep * p`` (scalar decay), then ``W -= coef * (W v) v^T`` over the row runs that
    ``spectral.power_rows`` returned (spectral decay; ``cols`` is the matrix width). Rules with a
    compiled kernel fold it into their single pass over memory; every other path applies it first.
    """

    keep: float = 1.0
    coef: float = 0.0
    cols: int = 0
    runs: list[spectral.PowerRun] = field(default_factory=list)

    @property
    def rank1(self) -> bool:
        return self.coef != 0.0 and bool(self.runs)

    def apply_(self, p: torch.Tensor) -> None:
        if self.keep != 1.0:
            p.mul_(self.keep)
        if self.rank1:
            spectral.apply_rank1(p.view(-1, self.cols), self.runs, self.coef)


NO_DECAY = Decay()
