"""Collectives on flat buckets, time-bounded waits, and the checks that every rank agrees.

Every wait is bounded (``timeout`` seconds, well under the process group's own timeout), and a wait
that runs out raises ``CollectiveTimeout`` naming the collective and what the optimizer was doing,
instead of hanging until the process group gives up. Collectives that only some ranks may reach by
mistake (state gathering, cross-rank checks, ``clip_grad_norm_``) run on a second group of the same
ranks when the optimizer spans every process, so they can never pair with another rank's training
collectives.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the flat collectives; older releases only have the *_tensor names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

DEFAULT_TIMEOUT = 300.0  # seconds; process groups default to 10 (NCCL) or 30 (gloo) minutes


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the optimizer's ``collective_timeout``: some rank is elsewhere."""


def _device_for(group: Any | None) -> torch.device:
    """Where this group's tensors must live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_side_groups: dict[tuple[int, ...], Any] = {}


def _side_group(group: Any | None) -> Any | None:
    """A second process group of the same ranks, when ``group`` spans every process (then all of them
    build the optimizer, as new_group needs); None for a subgroup, whose ranks use ``group`` itself.
    Made once per default group, since every rank makes it in the same order."""
    if dist.get_world_size(group) != dist.get_world_size():
        return None
    ranks = tuple(range(dist.get_world_size()))
    side = _side_groups.get(ranks)
    if side is None or side not in dist.distributed_c10d._world.pg_map:  # made before a re-initialisation
        side = _side_groups[ranks] = dist.new_group(list(ranks))
    return side


class _Waiter:
    """One daemon thread that waits for collectives, so the caller can stop waiting after a timeout
    (gloo's ``work.wait(timeout)`` is not honoured by every collective). After a timeout the thread
    stays with that collective; the process group is unusable by then anyway."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="adams_dist-waiter", daemon=True).start()

    def _run(self) -> None:
        while True:
            work, done, errors = self.jobs.get()
            try:
                work.wait()
            except BaseException as e:  # handed to the caller
                errors.append(e)
            done.set()

    def wait(self, work: Any, seconds: float) -> bool:
        """Wait for ``work`` at most ``seconds``; False if it has not finished by then."""
        done = threading.Event()
        errors: list[BaseException] = []
        self.jobs.put((work, done, errors))
        if not done.wait(seconds):
            return False
        if errors:
            raise errors[0]
        return True


_waiter: _Waiter | None = None


class Handle:
    """An issued collective; ``wait()`` waits at most the timeout, then raises CollectiveTimeout."""

    def __init__(self, work: Any, comm: Comm | None, what: str):
        self.work, self.comm, self.what = work, comm, what

    def wait(self) -> None:
        global _waiter
        comm = self.comm
        if self.work is None or comm is None:
            return
        if comm.nccl:  # wait() only orders CUDA streams; NCCL's watchdog bounds the collective itself
            self.work.wait()
            return
        _waiter = _waiter or _Waiter()
        if not _waiter.wait(self.work, comm.timeout):
            raise CollectiveTimeout(
                f"{self.what} during {comm.context} waited more than {comm.timeout:g} s for the other "
                f"{comm.world_size - 1} rank(s) (this is rank {comm.rank}). Some rank is not making the "
                "same call: every rank must call step(), state_dict(), clip_grad_norm_() and checkpoint functions "
                "the same number of times, in the same order (collective_timeout= sets this limit)"
            )


DONE = Handle(None, None, "nothing")


class Comm:
    """The process group an optimizer shards over, with the few collectives it needs."""

    def __init__(self, group: Any | None, timeout: float = DEFAULT_TIMEOUT):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        self.timeout = float(timeout)
        self.nccl = dist.get_backend(group) == "nccl"
        self.context = "construction"  # what the optimizer is doing, for error messages
        self.collectives = 0  # issued by this optimizer, for tests and benchmarks
        self.bytes_sent = 0  # ring-algorithm bytes this rank sends, for benchmarks
        self.side: Any = _side_group(group) if self.world_size > 1 else None

    def _count(self, n_bytes: float) -> None:
        self.collectives += 1
        self.bytes_sent += int(n_bytes)

    def _group(self, side: bool) -> Any:
        """The side group when asked for and there is one, else the optimizer's group."""
        return self.side if side and self.side is not None else self.group

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, what: str) -> Handle:
        self._count(inp.numel() * inp.element_size() * (self.world_size - 1) / self.world_size)
        return Handle(_reduce_scatter(out, inp, group=self.group, async_op=True), self, what)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, what: str, side: bool = False) -> Handle:
        self._count(out.numel() * out.element_size() * (self.world_size - 1) / self.world_size)
        return Handle(_all_gather(out, inp, group=self._group(side), async_op=True), self, what)

    def all_reduce(self, t: torch.Tensor, what: str, op: Any = dist.ReduceOp.SUM, side: bool = False) -> Handle:
        """Start an all-reduce of ``t`` in place; ``wait()`` on the handle."""
        self._count(2 * t.numel() * t.element_size() * (self.world_size - 1) / self.world_size)
        return Handle(dist.all_reduce(t, op=op, group=self._group(side), async_op=True), self, what)

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values of ``tensors`` to every rank, one flat broadcast per dtype/device."""
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for ts in by_kind.values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts]) if ts else torch.empty(0)
            self._count(flat.numel() * flat.element_size())
            Handle(dist.broadcast(flat, src=self.src, group=self.group, async_op=True), self, "broadcast").wait()
            offset = 0
            for t in ts:
                n = t.numel()
                t.detach().copy_(flat[offset: offset + n].view(t.shape))
                offset += n

    def gather_json(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (anything ``json`` encodes), in rank order, over the side group. Two small
        all-gathers of tensors, so it needs neither pickle nor numpy (``all_gather_object`` needs both)."""
        def bounded(work: Any, name: str) -> None:
            Handle(work, self, f"{what} ({name})").wait()

        return all_gather_json(obj, self._group(side=True), bounded)

    def check_same_everywhere(self, fingerprint: list[str], what: str) -> None:
        """Raise on every rank, naming the first difference, unless all ranks pass equal lists."""
        gathered = self.gather_json(fingerprint, f"the check that every rank has the same {what}")
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


def all_gather_json(obj: Any, group: Any | None = None, wait: Any = None) -> list[Any]:
    """Every rank's ``obj`` (anything ``json`` encodes), in rank order, over ``group``.

    ``wait(work, name)`` waits for each collective (default: an unbounded ``work.wait()``)."""
    wait = wait or (lambda work, name: work.wait())
    world, device = dist.get_world_size(group), _device_for(group)
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    mine = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    wait(dist.all_gather_into_tensor(sizes, mine, group=group, async_op=True), "sizes")
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = torch.empty(world * longest, dtype=torch.uint8, device=device)
    wait(dist.all_gather_into_tensor(out, padded, group=group, async_op=True), "payload")
    rows = out.view(world, longest).cpu()
    return [json.loads(bytes(rows[r, : int(sizes[r])].tolist()).decode()) for r in range(world)]
