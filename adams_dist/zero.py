"""ZeRO over a process group: every parameter's rows packed into flat buckets.

A bucket is laid out as ``[rank-0 rows | rank-1 rows | ...]``, so one reduce-scatter averages its
gradients into each rank's rows and one all-gather writes the updated rows back. Per-parameter
state entries are views into per-bucket buffers. Backward hooks count backward passes and, with
``overlap``, launch each bucket as soon as its gradients are final.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import quant8
from .comm import Comm
from .fsdp import DTensor, Replicate, Shard
from .layout import Bucket, Slot, gather_rows, pack_buckets, scatter_rows
from .shards import Grads, Shards

MAX_IN_FLIGHT = 2  # buckets whose staging buffers may exist at once outside overlap mode


def _rows_dtensor(local: torch.Tensor, slot: Slot, per_row: bool, mesh: DeviceMesh) -> DTensor:
    """This rank's flat rows of one state tensor as chunk ``rank`` of dim 0 of ``slot.rows_shape`` (a
    replicated u: whole on every rank)."""
    if per_row and slot.u_replicated:
        return DTensor.from_local(local, mesh, [Replicate()], run_check=False)
    shape = slot.rows_shape(per_row)
    return DTensor.from_local(local.view(-1, *shape[1:]), mesh, [Shard(0)], run_check=False,
                              shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())


class ZeroBuckets(Shards):
    """ZeRO: rows packed into flat buckets ``[rank-0 rows | rank-1 rows | ...]``, one reduce-scatter
    and one all-gather per bucket. Per-parameter state entries are views into per-bucket buffers."""

    def __init__(self, comm: Comm, master_dtype: torch.dtype, dtypes: dict[str, torch.dtype | None], bucket_mb: float,
                 grad_comm_dtype: torch.dtype, overlap: bool):
        super().__init__(comm, master_dtype, dtypes)
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
        self._zero_grads_at_launch = 0  # zero_grad() calls before the latest launch: later ones make it stale
        self._end_queued = False  # this backward pass's end-of-backward callback is queued
        self._hooks: list[Any] = []
        self._mesh: DeviceMesh | None = None  # the group as a 1-D mesh, for sharded state dicts

    @property
    def sharded(self) -> str | None:
        return f"a process group of {self.world_size} ranks (ZeRO mode)"

    def add(self, params: list[tuple[int, torch.Tensor]], spectral: bool, fingerprint: list[str]) -> list[Slot]:
        new = super().add(params, spectral, fingerprint)
        self._check_order([s.param for s in new])
        self.broadcast([s.param for s in new])  # everyone starts from rank 0's weights
        comm_bytes = torch.empty((), dtype=self.grad_comm_dtype).element_size()
        for bucket in pack_buckets(list(reversed(new)), self.bucket_bytes, self.world_size, comm_bytes):
            n = bucket.section_numel
            # A master of the parameters' own dtype is their rows: held once, in the parameters themselves
            aliased = (self.dtypes["master_param"] or bucket.dtype) == bucket.dtype and all(
                s.param.is_contiguous() for s in bucket.slots)
            flat = {name: torch.zeros(n, dtype=dtype or bucket.dtype, device=bucket.device)
                    for name, dtype in self.dtypes.items() if not (aliased and name == "master_param")}
            flat["u"] = torch.ones(bucket.u_numel, dtype=self.master_dtype, device=bucket.device)
            for slot in bucket.slots if not aliased else ():
                lo, hi = slot.local_range
                flat["master_param"][slot.offset: slot.offset + slot.local_numel].copy_(
                    slot.param.detach().reshape(-1)[lo:hi])
            self._bucket_of.update({s.index: len(self.buckets) for s in bucket.slots})
            self.buckets.append(bucket)
            self._flat.append(flat)
        self._register_hooks(new)
        return new

    def _check_order(self, params: list[torch.Tensor]) -> None:
        """Raise on every rank when some rank lists the same parameters as rank 0 in another order.

        Shapes alone cannot tell (the init fingerprint compares them), but models built from one seed
        hold equal values before rank 0's weights are broadcast: when a rank's per-parameter value sums
        are rank 0's, permuted, its list is in another order, and the broadcast would mix up the layers.
        """
        sums = [f"{float(torch.sum(p.detach(), dtype=torch.float64)):.12e}/"
                f"{float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)):.12e}" for p in params]
        gathered = self.gather_json(sums, "the check of the parameter order")
        for rank, other in enumerate(gathered):
            if other != gathered[0] and sorted(other) == sorted(gathered[0]):
                moved = next(i for i, (a, b) in enumerate(zip(gathered[0], other)) if a != b)
                raise ValueError(
                    f"rank {rank} lists the optimizer's parameters in another order than rank 0: its parameter "
                    f"#{moved} (shape {tuple(params[moved].shape)}) holds the values of another of rank 0's. "
                    "Build the model and pass its parameters in the same order on every rank (named parameters, "
                    "e.g. model.named_parameters(), let the optimizer compare names)."
                )

    def state_of(self, slot: Slot) -> dict[str, torch.Tensor]:
        bi = self._bucket_of[slot.index]
        flat = self._flat[bi]
        state = {name: flat[name][slot.offset: slot.offset + slot.local_numel] for name in self.names if name in flat}
        if "master_param" not in flat:  # the parameter's own rows
            lo, hi = slot.local_range
            state["master_param"] = slot.param.detach().view(-1)[lo:hi]
        if slot.spectral is not None:
            state["u"] = flat["u"][slot.u_offset: slot.u_offset + slot.u_local]
        state.update(quant8.new_scales(self.quantized, slot.local_numel, self.buckets[bi].device))
        return state

    # ------------------------------------------------------------------ gradients in

    @property
    def in_flight(self) -> int:
        """Bucket reductions issued and not yet waited for."""
        return len(self._pending)

    def _launched(self, bi: int) -> bool:
        return bi in self._pending or bi in self._reduced or self._grads is not None

    def _launch(self, bi: int) -> None:
        bucket, w = self.buckets[bi], self.world_size
        staging = torch.zeros(bucket.section_numel * w, dtype=self.grad_comm_dtype, device=bucket.device)
        for slot in bucket.slots:
            if slot.param.grad is not None:
                scatter_rows(slot.param.grad.reshape(-1), staging, slot, w)
        if self.inv_scale != 1.0:  # each rank unscales its own gradients: ranks' loss scales may differ
            staging.mul_(self.inv_scale)
        self._mark(bucket.slots)
        self._zero_grads_at_launch = self.zero_grads
        shard = torch.empty(bucket.section_numel, dtype=self.grad_comm_dtype, device=bucket.device)
        work = self.comm.reduce_scatter(shard, staging, f"the gradient reduce-scatter of bucket {bi}")
        self._pending[bi] = (work, shard, staging)

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
            if not self._launched(bi):
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

    def discard(self, new_step: bool = True) -> None:
        for work, _, _ in self._pending.values():
            work.wait()
        self._pending.clear()
        self._reduced.clear()
        self._ready.clear()
        if new_step:
            self._end_queued = False
        super().discard(new_step)

    # ------------------------------------------------------------------ backward hooks

    def _register_hooks(self, slots: list[Slot]) -> None:
        """Every trainable param counts backward passes; with ``overlap`` its hook also launches buckets."""
        for slot in slots:
            if slot.param.requires_grad:  # a frozen param never gets a gradient: it holds no bucket back
                hook = self._make_hook(slot.index, self._bucket_of[slot.index])
                self._hooks.append(slot.param.register_post_accumulate_grad_hook(hook))

    def _make_hook(self, index: int, bi: int):
        owner = weakref.ref(self)  # a dropped optimizer's hooks must not keep it alive, nor act

        @torch.compiler.disable  # bookkeeping and collectives: run as is under a compiled train step
        def hook(_param: torch.Tensor) -> None:
            shards = owner()
            if shards is None:
                return
            if not shards._end_queued:
                shards._end_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(shards._end_of_backward)
            if not shards.overlap or shards.accumulating:
                return
            if shards._launched(bi):
                if shards.zero_grads > shards._zero_grads_at_launch:
                    return  # the launched reduction is stale: step() sees the edit and reduces again
                raise RuntimeError(
                    "a gradient arrived after its bucket was already reduced for this step; wrap every "
                    "micro-batch but the last in `with optimizer.no_sync():` when accumulating with overlap=True"
                )
            shards._ready.add(index)
            shards._launch_ready()
        return hook

    def _launch_ready(self, everything: bool = False) -> None:
        """Launch buckets in bucket order only, so every rank issues the same sequence of collectives."""
        for bi in range(len(self.buckets)):
            if self._launched(bi):
                continue
            if everything or all(s.index in self._ready or not s.param.requires_grad for s in self.buckets[bi].slots):
                self._launch(bi)
            else:
                break

    @torch.compiler.disable
    def _end_of_backward(self) -> None:
        """Once per backward pass, after every gradient is final. With ``overlap``, launch every bucket not
        launched yet (params that got no gradient count as zero), as DDP does: no collective a user runs
        between backward and step can then pair with ours."""
        self._end_queued = False
        self.backward_passes += 1
        if self.overlap and not self.accumulating:
            self._launch_ready(everything=True)

    # ------------------------------------------------------------------ parameters out

    def write_back(self, state: dict[Any, dict[str, Any]]) -> None:
        """All-gather every bucket's updated rows (at most MAX_IN_FLIGHT at once) into the parameters."""
        in_flight: list[tuple[Any, torch.Tensor, torch.Tensor, Bucket]] = []
        for bucket, flat in zip(self.buckets, self._flat):
            n = bucket.section_numel
            out = torch.empty(n * self.world_size, dtype=bucket.dtype, device=bucket.device)
            send = out[self.rank * n: (self.rank + 1) * n]  # in place: no send buffer besides the output
            self._section(bucket, flat, "master_param", state, into=send)
            in_flight.append((self.comm.all_gather(out, send, "the parameter all-gather"), out, send, bucket))
            if len(in_flight) >= MAX_IN_FLIGHT:
                self._unpack(*in_flight.pop(0))
        for gather in in_flight:
            self._unpack(*gather)
        self.record_versions()

    @staticmethod
    def _section(bucket: Bucket, flat: dict[str, torch.Tensor], name: str, state: dict[Any, dict[str, Any]],
                 into: torch.Tensor | None = None, dequantize: bool = False) -> torch.Tensor:
        """This rank's section of one state entry (copied ``into`` a buffer when given): its own buffer, or
        for a master that lives in the parameters, their rows packed; ``dequantize``: 8-bit moments' float32 values."""
        if name in flat and into is None and not dequantize:
            return flat[name]
        dtype = torch.float32 if dequantize else bucket.dtype
        out = torch.zeros(bucket.section_numel, dtype=dtype, device=bucket.device) if into is None else into
        if name in flat and not dequantize:
            return out.copy_(flat[name])
        out.zero_()  # the padding between slots
        for slot in bucket.slots:
            st = state[slot.param]
            out[slot.offset: slot.offset + slot.local_numel].copy_(
                quant8.load(st, name, dtype) if dequantize else st[name])
        return out

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
            for name in flat if "master_param" in flat else ("master_param", *flat):
                buf = self._section(bucket, flat, name, state, dequantize=name in self.quantized)
                out = torch.empty(buf.numel() * w, dtype=buf.dtype, device=buf.device)
                self.comm.all_gather(out, buf, f"the all-gather of optimizer state '{name}'", side=True).wait()
                for slot in bucket.slots:
                    if name != "u":
                        full[slot.index][name] = torch.empty(slot.param.numel(), dtype=buf.dtype, device=buf.device)
                        gather_rows(out, slot, w, full[slot.index][name])
                    elif slot.u_replicated:  # the same on every rank: rank 0's
                        full[slot.index]["u"] = out.view(w, -1)[0, slot.u_offset: slot.u_offset + slot.u_local].clone()
                    elif slot.spectral is not None:
                        rows = out.view(w, -1)[:, slot.u_offset: slot.u_offset + slot.rows_per_rank]
                        full[slot.index]["u"] = rows.reshape(-1)[: slot.rows].clone()
        return full

    def sharded_state(self, state: dict[Any, dict[str, Any]]) -> dict[int, dict[str, torch.Tensor]]:
        if self._mesh is None:
            device_type = self.buckets[0].device.type if self.buckets else "cpu"
            group = self.comm.group or dist.group.WORLD
            assert group is not None  # ZeRO mode runs in an initialised process group
            self._mesh = DeviceMesh.from_group(group, device_type)
        return {index: {name: _rows_dtensor(t, slot, name == "u", self._mesh) for name, t in entry.items()}
                for (index, entry), slot in zip(self.local_state(state).items(), self.slots)}

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> Shards:
        new = super().__deepcopy__(memo)
        assert isinstance(new, ZeroBuckets)
        new._register_hooks(new.slots)
        return new
