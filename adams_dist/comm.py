"""Collectives on flat buckets, and the init-time check that every rank built the same optimizer."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the flat collectives; older releases only have the *_tensor names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _device_for(group: Any | None) -> torch.device:
    """Where this group's tensors must live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(obj: Any, group: Any | None = None) -> list[Any]:
    """Every rank's ``obj`` (anything ``json`` encodes), in rank order. Two small all-gathers of
    tensors, so it needs neither pickle nor numpy (torch's ``all_gather_object`` needs both)."""
    world, device = dist.get_world_size(group), _device_for(group)
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device), group=group)
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = torch.empty(world * longest, dtype=torch.uint8, device=device)
    dist.all_gather_into_tensor(out, padded, group=group)
    rows = out.view(world, longest).cpu()
    return [json.loads(bytes(rows[r, : int(sizes[r])].tolist()).decode()) for r in range(world)]


class Comm:
    """The process group an optimizer shards over, with the few collectives it needs."""

    def __init__(self, group: Any | None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        self.collectives = 0  # issued by this optimizer, for tests and benchmarks
        self.bytes_sent = 0  # ring-algorithm bytes this rank sends, for benchmarks

    def _count(self, n_bytes: float) -> None:
        self.collectives += 1
        self.bytes_sent += int(n_bytes)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor) -> Any:
        self._count(inp.numel() * inp.element_size() * (self.world_size - 1) / self.world_size)
        return _reduce_scatter(out, inp, group=self.group, async_op=True)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> Any:
        self._count(out.numel() * out.element_size() * (self.world_size - 1) / self.world_size)
        return _all_gather(out, inp, group=self.group, async_op=True)

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM, async_op: bool = False) -> Any:
        """All-reduce ``t`` in place; returns ``t``, or with ``async_op`` the handle to ``wait()`` on."""
        self._count(2 * t.numel() * t.element_size() * (self.world_size - 1) / self.world_size)
        work = dist.all_reduce(t, op=op, group=self.group, async_op=async_op)
        return work if async_op else t

    def broadcast(self, t: torch.Tensor) -> None:
        self._count(t.numel() * t.element_size())
        dist.broadcast(t, src=self.src, group=self.group)

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values of ``tensors`` to every rank, one flat broadcast per dtype/device."""
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for ts in by_kind.values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts]) if ts else torch.empty(0)
            self.broadcast(flat)
            offset = 0
            for t in ts:
                n = t.numel()
                t.detach().copy_(flat[offset: offset + n].view(t.shape))
                offset += n

    def check_same_everywhere(self, fingerprint: list[str], what: str) -> None:
        """Raise on every rank, naming the first difference, unless all ranks pass equal lists."""
        gathered = all_gather_json(fingerprint, self.group)
        reference = gathered[0]
        for rank, other in enumerate(gathered):
            if other == reference:
                continue
            for i in range(max(len(reference), len(other))):
                mine = reference[i] if i < len(reference) else "<missing>"
                theirs = other[i] if i < len(other) else "<missing>"
                if mine != theirs:
                    raise ValueError(
                        f"{what} differs between ranks: rank 0 has {mine}, rank {rank} has {theirs} "
                        f"(entry {i}; rank 0 has {len(reference)} entries, rank {rank} has {len(other)}). "
                        "Every rank must build the optimizer over the same parameters, in the same order, "
                        "with the same hyperparameters."
                    )
