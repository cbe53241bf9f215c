"""The step's one small SUM all-reduce, as an object with named fields.

Every rank contributes its partial of each field; after ``wait()`` every field holds the sum
over the ranks. Fields travel in one flat fp32 vector, so a step pays one collective's latency
for all of them, however many matrices get spectral decay.

Ranks also check, in the same vector, that they agree on what happened since the previous step:
each rank sets a one in one slot per checked value (``AGREEMENT``), so after the sum a value on
which ranks differ has more than one slot set. A skipped ``step()`` on one rank cannot be seen
from step counts (collectives pair by call order, so later steps still pair equal counts), but it
shows in the backward passes and ``zero_grad()`` calls between steps.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch

from .validation import ENGINE_KEYS

# What every rank must agree on, and how many slots its one-hot code takes (values wrap around).
AGREEMENT = {"backward passes": 16, "zero_grad() calls": 16, "param groups": 64}


class Control:
    """``grad_norm_sq``: squared global gradient norm (filled in only when clipping or skipping needs it);
    ``has_grad``: per slot, how many ranks had a gradient; ``wtu``: per spectral slot index, the
    ``(heads, cols)`` partial ``W^T u`` of this rank's rows; ``edited``: how many ranks edited a gradient
    after its reduction read it; ``found_inf``: how many ranks' GradScaler found inf/NaN gradients;
    ``builds``: how many ranks have kernel builds pending (``kernel="background"``);
    ``agreement``: the one-hot codes of ``AGREEMENT``."""

    def __init__(self, has_grad: torch.Tensor, wtu: dict[int, torch.Tensor], agree: dict[str, int]):
        self.grad_norm_sq = has_grad.new_zeros(1)
        self.has_grad = has_grad
        self.wtu = wtu
        self.edited = has_grad.new_zeros(1)
        self.found_inf = has_grad.new_zeros(1)
        self.builds = has_grad.new_zeros(1)
        self.agreement = has_grad.new_zeros(sum(AGREEMENT.values()))
        offset = 0
        for name, slots in AGREEMENT.items():
            self.agreement[offset + agree[name] % slots] = 1.0
            offset += slots
        self._vector: torch.Tensor | None = None
        self._work: Any = None
        self.any_edited = self.any_found_inf = self.any_builds = False  # the decisions wait() reads to the host
        self.grad_norm_sq_host = 0.0  # grad_norm_sq as read with them
        self.active: list[bool] = []
        self.differ: list[str] = []

    def _fields(self) -> list[torch.Tensor]:
        return [self.grad_norm_sq, self.has_grad, self.edited, self.found_inf, self.builds, self.agreement,
                *self.wtu.values()]

    def start(self, all_reduce: Callable[[torch.Tensor], Any]) -> None:
        """Pack the fields and start ``all_reduce`` on them (it returns a handle with ``wait()``)."""
        self._vector = torch.cat([f.reshape(-1).float() for f in self._fields()])
        self._work = all_reduce(self._vector)

    def wait(self) -> None:
        """Wait for the sum, point every field at its part of it, and read the step's decisions to the host
        in one transfer (one device sync per step): ``grad_norm_sq_host``, ``any_edited``, ``any_found_inf``,
        ``active`` (per slot: some rank had a gradient; a param with none anywhere is not stepped) and
        ``differ`` (the ``AGREEMENT`` names on which the ranks differ)."""
        assert self._vector is not None, "Control.wait() before start()"
        self._work.wait()
        fields = self._fields()
        parts = torch.split(self._vector, [f.numel() for f in fields])
        self.grad_norm_sq, self.has_grad, self.edited, self.found_inf, self.builds, self.agreement, *wtu = [
            p.view(f.shape) for p, f in zip(parts, fields)]
        self.wtu = dict(zip(self.wtu, wtu))
        codes_set = torch.stack([(c > 0).sum() for c in self.agreement.split(list(AGREEMENT.values()))])
        host = torch.cat([self.grad_norm_sq, self.edited, self.found_inf, self.builds, codes_set.float(),
                          self.has_grad]).tolist()
        self.grad_norm_sq_host, self.any_edited, self.any_found_inf, self.any_builds = (
            host[0], host[1] > 0, host[2] > 0, host[3] > 0)
        self.differ = [name for name, n in zip(AGREEMENT, host[4:4 + len(AGREEMENT)]) if n > 1]
        self.active = [n > 0 for n in host[4 + len(AGREEMENT):]]

    def check_agreement(self, step: int, gather_readable: Callable[[], list[dict[str, Any]]]) -> None:
        """Raise on every rank when the ranks did different things since the previous step (after ``wait()``).
        ``gather_readable()`` collects every rank's ``agreement_values(readable=True)`` to name them."""
        differ = self.differ
        if not differ:
            return
        values = gather_readable()
        first = next(r for r, v in enumerate(values) if any(v[name] != values[0][name] for name in differ))
        described = "; ".join(f"rank {r}: " + ", ".join(f"{values[r][name]} {name}" for name in differ)
                              for r in (0, first))
        raise RuntimeError(
            f"ranks disagree about what happened since the previous step (in step {step}): {described}. Every "
            "rank must run the same number of backward passes and zero_grad() calls between steps and call step() "
            "the same number of times (a rank that skips a step desynchronises every later collective), with the "
            "same param groups and hyperparameters."
        )


def agreement_values(backward_passes: int, zero_grads: int, groups: list[dict[str, Any]],
                     readable: bool = False) -> dict[str, Any]:
    """Per ``AGREEMENT`` name, this rank's value (``readable``: the param groups in full, not a CRC).
    Tensor hyperparameters are left out: reading them would wait for the device."""
    described = repr([[len(g["params"])] + [f"{k}={v!r}" for k, v in sorted(g.items())
                                            if k not in ENGINE_KEYS and not isinstance(v, torch.Tensor)]
                      for g in groups])
    return {"backward passes": backward_passes, "zero_grad() calls": zero_grads,
            "param groups": described if readable else zlib.crc32(described.encode())}
