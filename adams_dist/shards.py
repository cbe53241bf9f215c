"""Where this rank's rows of every parameter live: one class per sharding mode.

- ``LocalRows``: one process; every row is local and the gradient is ``p.grad`` itself.
- ``ZeroBuckets``: ZeRO over a process group; rows packed into flat buckets, gradients averaged
  with one reduce-scatter per bucket, updated rows all-gathered back into the parameters.
- ``DTensorRows``: FSDP2 (or hand-built Shard(0) DTensor) parameters; each rank already holds its
  rows and FSDP2 has already averaged their gradients.

Each owns its state buffers, gradient reduction (``start_reduce`` then ``wait_reduce``), the
write-back of updated rows, state gathering for state dicts, and ``rows_of`` (this rank's rows of a
full tensor). The engine holds one of them and never asks which.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

from . import fsdp
from .comm import Comm
from .layout import Bucket, Slot, gather_rows, make_slot, pack_buckets, scatter_rows

MAX_IN_FLIGHT = 2  # buckets whose staging buffers may exist at once outside overlap mode
Grads = list[torch.Tensor | None]


class _Done:
    """The handle of a collective that had nothing to wait for (one process)."""

    def wait(self) -> None:
        pass


class Shards:
    """Rows of every parameter on this rank, with the state buffers and collectives of one mode.

    ``names`` are the per-element state buffers (``master_param`` first, then the rule's moments).
    """

    takes_dtensors = False  # whether parameters arrive as DTensors (one optimizer cannot mix both)

    def __init__(self, comm: Comm | None, master_dtype: torch.dtype, names: tuple[str, ...]):
        self.comm = comm
        self.world_size = comm.world_size if comm else 1
        self.rank = comm.rank if comm else 0
        self.master_dtype = master_dtype
        self.names = names
        self.slots: list[Slot] = []
        self._grads: Grads | None = None  # this step's gradient rows per slot, kept until discard()
        self._versions: dict[int, int] = {}  # param version after our last write: a change means a user edit
        self.accumulating = False  # inside no_sync(): backward hooks launch no reduction

    @property
    def sharded(self) -> str | None:
        """How the state is split, for error messages; None when this process holds all of it."""
        return None

    # ------------------------------------------------------------------ building

    def _make_slot(self, p: torch.Tensor, index: int, group_index: int, spectral: bool) -> Slot:
        return make_slot(p, index, group_index, self.world_size, self.rank, spectral)

    def add(self, params: list[tuple[int, torch.Tensor]], spectral: bool, fingerprint: list[str]) -> list[Slot]:
        """Place ``(group index, param)`` pairs; every rank must pass the same ``fingerprint``."""
        if self.comm is not None:
            self.comm.check_same_everywhere(fingerprint, "the optimizer's parameter list")
        new = [self._make_slot(p, len(self.slots) + i, gi, spectral) for i, (gi, p) in enumerate(params)]
        self.slots.extend(new)
        return new

    def state_of(self, slot: Slot) -> dict[str, torch.Tensor]:
        """Fresh state tensors of one parameter's local rows; the master aliases an fp32 contiguous param."""
        p = fsdp.local_tensor(slot.param.detach())
        state = {name: torch.zeros(p.numel(), dtype=self.master_dtype, device=p.device) for name in self.names}
        if p.dtype == self.master_dtype and p.is_contiguous():
            state["master_param"] = p.view(-1)
        else:
            state["master_param"].copy_(p.reshape(-1))
        if slot.spectral is not None:
            state["u"] = torch.ones(slot.local_rows, dtype=self.master_dtype, device=p.device)
        return state

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> Any:
        """Start an all-reduce of ``t`` in place over the ranks that share rows; returns a handle to wait on."""
        return self.comm.all_reduce(t, op=op, async_op=True) if self.comm else _Done()

    def reduce_min(self, t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        """Element-wise min of ``t`` over the ranks, as float64 on the CPU."""
        t = t.to(device=device, dtype=torch.float64)
        self.all_reduce(t, dist.ReduceOp.MIN).wait()
        return t.cpu()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        if self.comm is not None:
            self.comm.broadcast_tensors(tensors)

    # ------------------------------------------------------------------ gradients in

    def start_reduce(self) -> None:
        """Issue this step's gradient reduction (what backward hooks have not issued already)."""

    def wait_reduce(self) -> Grads:
        """This rank's averaged gradient rows per slot (None: no gradient here), kept until ``discard``."""
        if self._grads is None:
            self._grads = [None if s.param.grad is None else
                           fsdp.local_tensor(s.param.grad).reshape(-1).to(self.master_dtype) for s in self.slots]
        return self._grads

    def scale_grads(self, grads: Grads, coef: torch.Tensor) -> None:
        """Clip the rows the update will use, and ``p.grad`` too where they are copies (as torch does)."""
        present = [g for g in grads if g is not None]
        if present:
            torch._foreach_mul_(present, coef)
        for slot, g in zip(self.slots, grads):
            pg = slot.param.grad
            if g is not None and pg is not None and fsdp.local_tensor(pg).data_ptr() != g.data_ptr():
                pg.mul_(coef.to(pg.dtype))

    def discard(self) -> None:
        """Forget this step's gradient rows (after the step, or when the user zeroes the gradients)."""
        self._grads = None

    # ------------------------------------------------------------------ parameters out

    def rows_of(self, slot: Slot, full: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """This rank's flat rows of a parameter-shaped tensor (``per_row``: one value per row, like u)."""
        if fsdp.is_dtensor(full):
            full = full.full_tensor()  # type: ignore[attr-defined]
        lo, hi = (slot.row_start, slot.row_start + slot.local_rows) if per_row else slot.local_range
        return full.reshape(-1)[lo:hi]

    def write_back(self, state: dict[Any, dict[str, Any]]) -> None:
        """Copy the updated master rows into the parameters."""
        for slot in self.slots:
            p, master = fsdp.local_tensor(slot.param.detach()), state[slot.param]["master_param"]
            if master.data_ptr() != p.data_ptr() or p.dtype != master.dtype:
                p.copy_(master.view(p.shape))
        self.record_versions()

    def record_versions(self) -> None:
        self._versions = {s.index: fsdp.local_tensor(s.param)._version for s in self.slots}

    def adopt_edits(self, state: dict[Any, dict[str, Any]]) -> None:
        """Take parameters the user changed since our last write (e.g. loaded weights) as the new masters."""
        for slot in self.slots:
            local = fsdp.local_tensor(slot.param)
            if local._version != self._versions.get(slot.index):
                master = state[slot.param]["master_param"]
                if master.data_ptr() != local.data_ptr():
                    master.copy_(self.rows_of(slot, slot.param.detach()))

    # ------------------------------------------------------------------ state dicts

    def gather_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        """Every parameter's whole per-element state (and u) by slot index, flat."""
        return {s.index: {name: state[s.param][name].detach().clone() for name in self._names_of(s)}
                for s in self.slots}

    def state_bytes(self, state: dict[Any, dict[str, Any]]) -> int:
        """Bytes of state tensors this rank holds, counting shared storage once and not the params themselves."""
        seen: set[int] = set()
        total = 0
        for slot in self.slots:
            for name, t in state[slot.param].items():
                if not isinstance(t, torch.Tensor) or name == "step":
                    continue
                if name == "master_param" and t.data_ptr() == fsdp.local_tensor(slot.param).data_ptr():
                    continue  # aliases the parameter itself
                if t.data_ptr() in seen and t.numel():
                    continue
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def _names_of(self, slot: Slot) -> tuple[str, ...]:
        return (*self.names, "u") if slot.spectral is not None else self.names

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> Shards:
        new = copy.copy(self)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_hooks":
                new.__dict__[key] = []  # hooks belong to the original's parameters; the copy registers its own
            elif key != "comm":  # the process group is shared, not copied
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.record_versions()  # copied tensors restart their version counters
        return new

    def __getstate__(self) -> dict[str, Any]:
        if self.comm is not None:
            raise TypeError("a distributed optimizer cannot be pickled; save state_dict() or a checkpoint")
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.record_versions()


class LocalRows(Shards):
    """One process: every row is local."""

    def __init__(self, master_dtype: torch.dtype, names: tuple[str, ...]):
        super().__init__(None, master_dtype, names)


class DTensorRows(Shards):
    """DTensor parameters sharded on dim 0 (FSDP2): each rank updates the rows it already holds."""

    takes_dtensors = True

    @property
    def sharded(self) -> str | None:
        return "DTensor (FSDP2) parameters"

    def _make_slot(self, p: torch.Tensor, index: int, group_index: int, spectral: bool) -> Slot:
        return fsdp.make_slot(p, index, group_index, spectral)

    def rows_of(self, slot: Slot, full: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        if fsdp.is_dtensor(full):
            return fsdp.local_tensor(full).reshape(-1)
        return super().rows_of(slot, full, per_row)

    def gather_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        """DTensors laid out like the parameters: torch.distributed.checkpoint reshards them by itself."""
        local = super().gather_state(state)
        return {s.index: {name: fsdp.like_param(s.param, t, per_row=name == "u") for name, t in local[s.index].items()}
                for s in self.slots}


class ZeroBuckets(Shards):
    """ZeRO: rows packed into flat buckets ``[rank-0 rows | rank-1 rows | ...]``, one reduce-scatter
    and one all-gather per bucket. Per-parameter state entries are views into per-bucket buffers."""

    def __init__(self, comm: Comm, master_dtype: torch.dtype, names: tuple[str, ...], bucket_mb: float,
                 grad_comm_dtype: torch.dtype, overlap: bool):
        super().__init__(comm, master_dtype, names)
        self.comm: Comm = comm
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.grad_comm_dtype = grad_comm_dtype
        self.overlap = overlap
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[int, int] = {}  # slot index -> bucket index
        self._reduced: dict[int, torch.Tensor] = {}  # bucket -> averaged gradient shard, while reducing
        self._flat: list[dict[str, torch.Tensor]] = []  # per bucket: name -> this rank's section
        self._pending: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}  # bucket -> (work, shard, staging)
        self._ready: set[int] = set()  # slots whose gradient is final for this step (overlap mode)
        self._hooks: list[Any] = []

    @property
    def sharded(self) -> str | None:
        return f"a process group of {self.world_size} ranks (ZeRO mode)"

    def add(self, params: list[tuple[int, torch.Tensor]], spectral: bool, fingerprint: list[str]) -> list[Slot]:
        new = super().add(params, spectral, fingerprint)
        self.broadcast([s.param for s in new])  # everyone starts from rank 0's weights
        comm_bytes = torch.empty((), dtype=self.grad_comm_dtype).element_size()
        for bucket in pack_buckets(list(reversed(new)), self.bucket_bytes, self.world_size, comm_bytes):
            n = bucket.section_numel
            flat = {name: torch.zeros(n, dtype=self.master_dtype, device=bucket.device) for name in self.names}
            flat["u"] = torch.ones(bucket.u_numel, dtype=self.master_dtype, device=bucket.device)
            for slot in bucket.slots:
                lo, hi = slot.local_range
                flat["master_param"][slot.offset: slot.offset + slot.local_numel].copy_(
                    slot.param.detach().reshape(-1)[lo:hi])
            self._bucket_of.update({s.index: len(self.buckets) for s in bucket.slots})
            self.buckets.append(bucket)
            self._flat.append(flat)
        if self.overlap:
            self._register_hooks(new)
        return new

    def state_of(self, slot: Slot) -> dict[str, torch.Tensor]:
        flat = self._flat[self._bucket_of[slot.index]]
        state = {name: flat[name][slot.offset: slot.offset + slot.local_numel] for name in self.names}
        if slot.spectral is not None:
            state["u"] = flat["u"][slot.u_offset: slot.u_offset + slot.local_rows]
        return state

    # ------------------------------------------------------------------ gradients in

    @property
    def in_flight(self) -> int:
        """Bucket reductions issued and not yet waited for."""
        return len(self._pending)

    def _launch(self, bi: int) -> None:
        bucket, w = self.buckets[bi], self.world_size
        staging = torch.zeros(bucket.section_numel * w, dtype=self.grad_comm_dtype, device=bucket.device)
        for slot in bucket.slots:
            if slot.param.grad is not None:
                scatter_rows(slot.param.grad.reshape(-1), staging, slot, w)
        shard = torch.empty(bucket.section_numel, dtype=self.grad_comm_dtype, device=bucket.device)
        self._pending[bi] = (self.comm.reduce_scatter(shard, staging), shard, staging)

    def _finish(self, bi: int, reduced: dict[int, torch.Tensor]) -> None:
        work, shard, _staging = self._pending.pop(bi)
        work.wait()
        reduced[bi] = shard.to(self.master_dtype).div_(self.world_size)

    def start_reduce(self) -> None:
        """Launch, in bucket order, every bucket the hooks have not; at most MAX_IN_FLIGHT staging
        buffers at once, so a step's extra memory is a couple of buckets, not a copy of the gradients."""
        if self._grads is not None:
            return
        for bi in range(len(self.buckets)):
            if bi not in self._pending and bi not in self._reduced:
                while len(self._pending) >= MAX_IN_FLIGHT:
                    self._finish(min(self._pending), self._reduced)
                self._launch(bi)

    def wait_reduce(self) -> Grads:
        if self._grads is None:
            self.start_reduce()
            while self._pending:
                self._finish(min(self._pending), self._reduced)
            grads: Grads = [None] * len(self.slots)
            for bi, bucket in enumerate(self.buckets):
                for slot in bucket.slots:
                    grads[slot.index] = self._reduced[bi][slot.offset: slot.offset + slot.local_numel]
            self._ready.clear()
            self._grads, self._reduced = grads, {}
        return self._grads

    def scale_grads(self, grads: Grads, coef: torch.Tensor) -> None:
        """The averaged shards are buffers of our own; ``p.grad`` keeps the local, unaveraged gradient."""
        present = [g for g in grads if g is not None]
        if present:
            torch._foreach_mul_(present, coef)

    def discard(self) -> None:
        for work, _, _ in self._pending.values():
            work.wait()
        self._pending.clear()
        self._reduced.clear()
        self._ready.clear()
        super().discard()

    def _register_hooks(self, slots: list[Slot]) -> None:
        for slot in slots:
            if slot.param.requires_grad:  # a frozen param never gets a gradient: it holds no bucket back
                hook = self._make_hook(slot.index, self._bucket_of[slot.index])
                self._hooks.append(slot.param.register_post_accumulate_grad_hook(hook))

    def _make_hook(self, index: int, bi: int):
        def hook(_param: torch.Tensor) -> None:
            if self.accumulating:
                return
            if bi in self._pending or self._grads is not None:
                raise RuntimeError(
                    "a gradient arrived after its bucket was already reduced for this step; wrap every "
                    "micro-batch but the last in `with optimizer.no_sync():` when accumulating with overlap=True"
                )
            self._ready.add(index)
            # Launch in bucket order only, so every rank issues the same sequence of collectives.
            for bj in range(len(self.buckets)):
                if bj in self._pending:
                    continue
                if all(s.index in self._ready or not s.param.requires_grad for s in self.buckets[bj].slots):
                    self._launch(bj)
                else:
                    break
        return hook

    # ------------------------------------------------------------------ parameters out

    def write_back(self, state: dict[Any, dict[str, Any]]) -> None:
        """All-gather every bucket's updated rows (at most MAX_IN_FLIGHT at once) into the parameters."""
        in_flight: list[tuple[Any, torch.Tensor, torch.Tensor, Bucket]] = []
        for bucket, flat in zip(self.buckets, self._flat):
            send = flat["master_param"].to(bucket.dtype)
            out = torch.empty(bucket.section_numel * self.world_size, dtype=bucket.dtype, device=bucket.device)
            in_flight.append((self.comm.all_gather(out, send), out, send, bucket))
            if len(in_flight) >= MAX_IN_FLIGHT:
                self._unpack(*in_flight.pop(0))
        for gather in in_flight:
            self._unpack(*gather)
        self.record_versions()

    def _unpack(self, work: Any, out: torch.Tensor, _send: torch.Tensor, bucket: Bucket) -> None:
        """Wait for a bucket's all-gather and copy every parameter's rows out of it."""
        work.wait()
        for slot in bucket.slots:
            p = slot.param.detach()
            if p.is_contiguous():
                gather_rows(out, slot, self.world_size, p.view(-1))
            else:
                tmp = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
                gather_rows(out, slot, self.world_size, tmp)
                p.copy_(tmp.view(p.shape))

    # ------------------------------------------------------------------ state dicts

    def gather_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        w = self.world_size
        full: dict[int, dict[str, torch.Tensor]] = {s.index: {} for s in self.slots}
        for bucket, flat in zip(self.buckets, self._flat):
            for name, buf in flat.items():
                out = torch.empty(buf.numel() * w, dtype=buf.dtype, device=buf.device)
                self.comm.all_gather(out, buf).wait()
                for slot in bucket.slots:
                    if name != "u":
                        full[slot.index][name] = torch.empty(slot.param.numel(), dtype=buf.dtype, device=buf.device)
                        gather_rows(out, slot, w, full[slot.index][name])
                    elif slot.spectral is not None:
                        rows = out.view(w, -1)[:, slot.u_offset: slot.u_offset + slot.rows_per_rank]
                        full[slot.index]["u"] = rows.reshape(-1)[: slot.rows].clone()
        return full

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> Shards:
        new = super().__deepcopy__(memo)
        assert isinstance(new, ZeroBuckets)
        if new.overlap:
            new._register_hooks(new.slots)
        return new
