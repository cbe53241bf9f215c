"""torch's GradScaler, with one loss scale for all ranks of a sharded optimizer.

torch's scaler decides found-inf from this rank's gradients alone, so after an overflow on one rank
that rank backs off its scale and the others grow theirs. Our optimizers already agree on found-inf
in the step's control all-reduce (every rank skips the same step); this scaler's ``update()`` uses
that agreed flag, so every rank's scale and growth tracker stay identical.
"""

from __future__ import annotations

from typing import Any

import torch


class GradScaler(torch.amp.GradScaler):
    """Drop-in ``torch.amp.GradScaler`` (same arguments) for adams_dist optimizers under torchrun."""

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        result = super().step(optimizer, *args, **kwargs)
        agreed = getattr(optimizer, "found_inf_anywhere", None)  # set by step() when a scaler handed it found_inf
        if self.is_enabled() and agreed is not None:
            for flag in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                flag.copy_(agreed.reshape(flag.shape))  # what update() reads to back off or grow the scale
        return result
