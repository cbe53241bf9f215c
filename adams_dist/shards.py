"""Where this rank's rows of every parameter live: one class per sharding mode.

- ``LocalRows``: one process; every row is local and the gradient is ``p.grad`` itself.
- ``ZeroBuckets`` (zero.py): ZeRO over a process group; rows packed into flat buckets, gradients
  averaged with one reduce-scatter per bucket, updated rows all-gathered back into the parameters.
- ``DTensorRows``: FSDP2 (or hand-built Shard(0) DTensor) parameters, or HSDP's (Replicate, Shard(0));
  each rank already holds its rows and FSDP2 has already averaged their gradients.

Each owns its state buffers, gradient reduction (``start_reduce`` then ``wait_reduce``), the
write-back of updated rows, state gathering for state dicts, and ``rows_of`` (this rank's rows of a
full tensor). The engine holds one of them and never asks which.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

from . import fsdp, quant8
from .comm import DONE, Comm, Handle
from .layout import Slot, make_slot

Grads = list[torch.Tensor | None]


class Shards:
    """Rows of every parameter on this rank, with the state buffers and collectives of one mode.

    ``dtypes`` maps the per-element state buffers (``master_param`` first, then the rule's moments) to
    their storage dtypes (None: the parameter's own, i.e. no master copy); gradients and u are kept in
    ``master_dtype``, the dtype the update computes in.
    """

    takes_dtensors = False  # whether parameters arrive as DTensors (one optimizer cannot mix both)

    def __init__(self, comm: Comm | None, master_dtype: torch.dtype, dtypes: dict[str, torch.dtype | None]):
        self.comm = comm
        self.world_size = comm.world_size if comm else 1
        self.rank = comm.rank if comm else 0
        self.master_dtype = master_dtype
        self.dtypes = dtypes
        self.names = tuple(dtypes)
        # moment_dtype="8bit": entries held as 8-bit codes, with float32 scales in "<name>_scale" (quant8.py)
        self.quantized = tuple(n for n, d in dtypes.items() if d in quant8.QMAX)
        self.slots: list[Slot] = []
        self._grads: Grads | None = None  # this step's gradient rows per slot, kept until discard()
        self._versions: dict[int, int] = {}  # param version after our last write: a change means a user edit
        self._marks: dict[int, tuple[int, int, float]] = {}  # slot -> p.grad's (id, version), inv_scale, when read
        self.inv_scale = 1.0  # 1 / the loss scale of a GradScaler: gradients are unscaled as they are read
        self.accumulating = False  # inside no_sync(): backward hooks launch no reduction
        self.backward_passes = 0  # since the last step, counted where hooks can see them (ZeRO)
        self.zero_grads = 0  # zero_grad() calls since the last step

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
        dtypes = {name: dtype or p.dtype for name, dtype in self.dtypes.items()}  # None: the parameter's dtype
        state = {name: torch.zeros(p.numel(), dtype=dtype, device=p.device) for name, dtype in dtypes.items()}
        if p.dtype == dtypes["master_param"] and p.is_contiguous():
            state["master_param"] = p.view(-1)
        else:
            state["master_param"].copy_(p.reshape(-1))
        if slot.spectral is not None:
            state["u"] = torch.ones(slot.u_local, dtype=self.master_dtype, device=p.device)
        state.update(quant8.new_scales(self.quantized, p.numel(), p.device))
        return state

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, t: torch.Tensor, what: str, op: Any = dist.ReduceOp.SUM, side: bool = False) -> Handle:
        """Start an all-reduce of ``t`` in place over the ranks that share rows; returns a handle to wait on.
        ``side``: on the second group, for calls some rank might make alone by mistake."""
        return self.comm.all_reduce(t, what, op=op, side=side) if self.comm else DONE

    def reduce_min(self, t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        """Element-wise min of ``t`` over the ranks, as float64 on the CPU."""
        t = t.to(device=device, dtype=torch.float64)
        self.all_reduce(t, "the MIN all-reduce of HomeAdam's v_hat", dist.ReduceOp.MIN).wait()
        return t.cpu()

    def gather_json(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` in rank order (just ``[obj]`` in one process)."""
        return self.comm.gather_json(obj, what) if self.comm else [obj]

    def set_context(self, context: str) -> None:
        """What the optimizer is doing, named by a collective that times out."""
        if self.comm is not None:
            self.comm.context = context

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        if self.comm is not None:
            self.comm.broadcast_tensors(tensors)

    # ------------------------------------------------------------------ gradients in

    def start_reduce(self) -> None:
        """Issue this step's gradient reduction (what backward hooks have not issued already)."""

    def wait_reduce(self) -> Grads:
        """This rank's averaged gradient rows per slot (None: no gradient here), kept until ``discard``."""
        if self._grads is None:
            self._mark(self.slots)
            grads = [fsdp.local_grad(s.param) for s in self.slots]
            self._grads = [None if g is None else self._unscaled(g.reshape(-1)) for g in grads]
        return self._grads

    def _unscaled(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` in the master dtype, divided by the loss scale (a new tensor then: p.grad stays as it is)."""
        g = g.to(self.master_dtype)
        return g if self.inv_scale == 1.0 else g * self.inv_scale

    def _mark(self, slots: list[Slot]) -> None:
        """Remember which gradient each slot's reduction read, to see edits made after it."""
        for s in slots:
            self._marks[s.index] = self._grad_key(s)

    def _grad_key(self, slot: Slot) -> tuple[int, int, float]:
        g = slot.param.grad
        return (0, 0, self.inv_scale) if g is None else (id(g), g._version, self.inv_scale)

    def edited(self) -> bool:
        """Whether some ``p.grad`` changed after its reduction read it (``p.grad = None``, ``zero_grad()``,
        an in-place clip), or the loss scale did: the reduction is stale and must run again."""
        return any(mark != self._grad_key(s) for s in self.slots if (mark := self._marks.get(s.index)) is not None)

    def reduce_again(self) -> Grads:
        """Reduce from the current gradients (every rank calls it when any rank's were edited)."""
        self.discard(new_step=False)
        self.start_reduce()
        return self.wait_reduce()

    def scale_grads(self, grads: Grads, coef: torch.Tensor) -> None:
        """Clip the rows the update will use, and ``p.grad`` too where they are copies (as torch does)."""
        present = [g for g in grads if g is not None]
        if present:
            torch._foreach_mul_(present, coef)
        for slot, g in zip(self.slots, grads):
            pg = slot.param.grad
            if g is not None and pg is not None and fsdp.local_tensor(pg).data_ptr() != g.data_ptr():
                pg.mul_(coef.to(pg.dtype))
        self._mark(self.slots)  # our own edit: the rows already hold it

    def discard(self, new_step: bool = True) -> None:
        """Forget this step's gradient rows; ``new_step``: the step is over, so are its counts."""
        self._grads = None
        self._marks.clear()
        if new_step:
            self.backward_passes = self.zero_grads = 0

    # ------------------------------------------------------------------ parameters out

    def rows_of(self, slot: Slot, full: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """This rank's flat rows of a parameter-shaped tensor (``per_row``: one value per row, like u),
        or of a sharded state dict's entry."""
        if fsdp.is_dtensor(full):
            if self._holds_my_rows(full, slot, per_row):
                return fsdp.local_tensor(full).reshape(-1)
            full = full.full_tensor()  # type: ignore[attr-defined]
        if per_row and slot.u_replicated:
            return full.reshape(-1)
        lo, hi = (slot.row_start, slot.row_start + slot.local_rows) if per_row else slot.local_range
        return full.reshape(-1)[lo:hi]

    def _holds_my_rows(self, t: Any, slot: Slot, per_row: bool) -> bool:
        """Whether DTensor ``t`` is laid out as ``sharded_state`` lays this rank's rows out (no gather needed)."""
        mesh = t.device_mesh
        return (mesh.ndim == 1 and mesh.size() == self.world_size and mesh.get_local_rank() == self.rank
                and tuple(t.placements) == (fsdp.Shard(0),) and tuple(t.shape) == slot.rows_shape(per_row))

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
                master, rows = state[slot.param]["master_param"], self.rows_of(slot, slot.param.detach())
                if master.data_ptr() != rows.data_ptr():  # not the parameter's own rows
                    master.copy_(rows)
                if "master_remainder" in state[slot.param]:  # the edited bf16 value is the whole master now
                    state[slot.param]["master_remainder"].zero_()

    # ------------------------------------------------------------------ state dicts

    def local_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        """Copies of this rank's rows of every parameter's per-element state (and u) by slot index, flat."""
        return {s.index: {name: self.exported(state[s.param], name) for name in self._names_of(s)} for s in self.slots}

    def exported(self, st: dict[str, Any], name: str) -> torch.Tensor:
        """A copy of one state entry as state dicts hold it: quantized moments as float32 values."""
        return quant8.load(st, name, torch.float32) if name in self.quantized else st[name].detach().clone()

    def load_rows(self, st: dict[str, Any], name: str, rows: torch.Tensor) -> None:
        """Set one state entry from this rank's rows of a state dict's (float) entry."""
        if name in self.quantized:
            quant8.store_(rows.to(self.master_dtype), st, name)
        else:
            st[name].copy_(rows)

    def gather_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        """Every parameter's whole per-element state (and u) by slot index, flat."""
        return self.local_state(state)

    def sharded_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        """Like ``gather_state``, but without gathering: where the state is split, DTensors of each rank's rows
        (``Slot.rows_shape``) that torch.distributed.checkpoint writes once and reshards on loading."""
        return self.gather_state(state)

    def state_bytes(self, state: dict[Any, dict[str, Any]]) -> int:
        """Bytes of state tensors this rank holds, counting shared storage once and not the params themselves."""
        seen: set[int] = set()
        total = 0
        for slot in self.slots:
            for name, t in state[slot.param].items():
                if not isinstance(t, torch.Tensor) or name == "step":
                    continue
                if name == "master_param" and _same_storage(t, fsdp.local_tensor(slot.param)):
                    continue  # the parameter's own rows
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
            elif key not in ("comm", "_mesh"):  # the process group (and its mesh) is shared, not copied
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

    def __init__(self, master_dtype: torch.dtype, dtypes: dict[str, torch.dtype | None]):
        super().__init__(None, master_dtype, dtypes)


class DTensorRows(Shards):
    """DTensor parameters sharded on dim 0 (FSDP2, or HSDP's replicated shards): each rank updates the rows
    it already holds."""

    takes_dtensors = True

    @property
    def sharded(self) -> str | None:
        return "DTensor (FSDP2) parameters"

    def _make_slot(self, p: torch.Tensor, index: int, group_index: int, spectral: bool) -> Slot:
        return fsdp.make_slot(p, index, group_index, spectral)

    def rows_of(self, slot: Slot, full: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        if per_row and slot.u_replicated:
            return (full.full_tensor() if fsdp.is_dtensor(full) else full).reshape(-1)  # type: ignore[attr-defined]
        if fsdp.is_dtensor(full):
            return fsdp.local_tensor(full).reshape(-1)
        assert slot.local_block is not None
        block = slot.local_block[:-1] if per_row else slot.local_block  # u: one value per row
        return full.reshape(slot.param.shape[:-1] if per_row else slot.param.shape)[block].reshape(-1)

    def gather_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        """DTensors laid out like the parameters: torch.distributed.checkpoint reshards them by itself."""
        local = super().gather_state(state)
        return {s.index: {name: fsdp.like_param(s.param, t, per_row=name == "u", replicated=s.u_replicated)
                          for name, t in local[s.index].items()} for s in self.slots}


def make_shards(params: list[torch.Tensor], process_group: Any | None, dtypes: dict[str, torch.dtype | None],
                master_dtype: torch.dtype, bucket_mb: float, grad_comm_dtype: torch.dtype, overlap: bool,
                timeout: float) -> Shards:
    """The sharding mode for ``params``: DTensor rows for FSDP2 parameters, ZeRO buckets over a group of
    more than one rank, local rows otherwise."""
    from .zero import ZeroBuckets  # zero.py builds on this module

    mesh_group = fsdp.mesh_group(params)
    if mesh_group is not None:
        comm = Comm(mesh_group, timeout)
        return DTensorRows(comm if comm.world_size > 1 else None, master_dtype, dtypes)
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        comm = Comm(process_group, timeout)
        if comm.world_size > 1:
            return ZeroBuckets(comm, master_dtype, dtypes, bucket_mb, grad_comm_dtype, overlap)
    return LocalRows(master_dtype, dtypes)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
