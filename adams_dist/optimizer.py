"""The engine: one torch.optim.Optimizer for one process or many, parameterised by an update rule.

Per step: (1) gradients are averaged into this rank's row shards (reduce-scatter per bucket, or
read in place with one process); (2) one small all-reduce carries the gradient-norm partial,
which params got a gradient anywhere, and the spectral ``W^T u`` partials; (3) decay and the
rule update this rank's master rows; (4) updated rows are all-gathered into the parameters.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import Optimizer

from . import ablations, fsdp, rules, spectral
from .comm import Comm
from .layout import Bucket, Slot, gather_rows, make_slot, pack_buckets, scatter_rows
from .rules import KERNELS, Rule

_ENGINE_KEYS = ("params", "param_names", "initial_lr")
MAX_IN_FLIGHT = 2  # buckets whose staging buffers may exist at once outside overlap mode


class ShardedOptimizer(Optimizer):
    """Shared engine of every optimizer in the package. Subclasses choose the rule and defaults."""

    rule: Rule
    uses_spectral_decay = False  # Adams: spectral decay on matrices, scalar decay on the rest

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        master_dtype: torch.dtype = torch.float32,
        process_group: Any | None = None,
        bucket_mb: float = 32.0,
        overlap: bool = False,
        grad_comm_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        kernel: str = "auto",
        **unknown: Any,
    ):
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {sorted(unknown)}; engine "
                            "options are master_dtype, process_group, bucket_mb, overlap, grad_comm_dtype, "
                            "max_grad_norm, skip_nonfinite, kernel")
        if not (isinstance(master_dtype, torch.dtype) and master_dtype.is_floating_point):
            raise TypeError(f"master_dtype must be a floating torch.dtype, got {master_dtype!r}")
        if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        if grad_comm_dtype is not None and not (
            isinstance(grad_comm_dtype, torch.dtype) and grad_comm_dtype.is_floating_point
        ):
            raise TypeError(f"grad_comm_dtype must be a floating torch.dtype or None, got {grad_comm_dtype!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        kernel = os.environ.get("ADAMS_DIST_KERNEL", kernel) if kernel == "auto" else kernel
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.master_dtype = master_dtype
        self.bucket_mb = float(bucket_mb)
        self.overlap = bool(overlap)
        self.grad_comm_dtype = grad_comm_dtype or torch.float32
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.last_grad_norm: torch.Tensor | None = None
        self.skipped_steps = 0

        self._comm: Comm | None = None
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            comm = Comm(process_group)
            self._comm = comm if comm.world_size > 1 else None
        self.world_size = self._comm.world_size if self._comm else 1
        self.rank = self._comm.rank if self._comm else 0

        self._slots: list[Slot] = []
        self._buckets: list[Bucket] = []
        self._bucket_state: list[dict[str, torch.Tensor]] = []  # flat per-rank buffers (distributed)
        self._device: torch.device | None = None
        self._reduced: dict[int, torch.Tensor] | None = None  # bucket -> averaged gradient shard
        self._grads: list[torch.Tensor | None] | None = None  # this step's local gradient rows per slot
        self._pending: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}  # bucket -> (work, shard, staging)
        self._ready_slots: set[int] = set()
        self._no_sync = False
        self._hook_handles: list[Any] = []
        self._versions: dict[int, int] = {}  # param version after our last write: a change means the user edited it
        self._presharded = False  # parameters are DTensors sharded by FSDP2: update local rows only
        # second_moment/rotate ablations (adams_dist/ablations.py, AdamATan2/AdamW, one process only):
        self._ablated: dict[int, ablations.Layout] = {}  # slot index -> layout, for params off the usual path
        self._ablation_cfg: dict[int, ablations.Config] = {}  # group index -> options the state was built for
        self._built = False
        super().__init__(params, defaults)
        self._build(range(len(self.param_groups)))
        self._built = True
        self._record_versions()

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered collection of Tensors, not a set")
        else:
            params = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(tensors):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter #{i} of the group is a {type(p).__name__}, not a Tensor")
            if not p.is_floating_point():
                raise TypeError(f"parameter #{i} of the group has dtype {p.dtype}; only floating-point "
                                "parameters can be optimized")
            if id(p) in seen:
                raise ValueError(f"parameter #{i} of the group (shape {tuple(p.shape)}) is listed twice; "
                                 "each tensor may appear once across all param groups")
            seen.add(id(p))
            if self._device is None:
                self._device = p.device
            elif p.device != self._device:
                raise ValueError(f"parameter #{i} of the group is on {p.device} but earlier parameters are on "
                                 f"{self._device}; all parameters must be on one device")
        param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        if self._built:
            self._build([len(self.param_groups) - 1])
            self._record_versions()

    def _validate_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Tensor lr must have one element, got shape {tuple(lr.shape)}")
            lr = float(lr)
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr!r} (must be >= 0)")
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):
                beta = float(beta)
            if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
                raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")
        group["betas"] = (float(betas[0]), float(betas[1]))
        ablations.validate_group(group, supported="second_moment" in self.defaults)
        for key in ("weight_decay", "scalar_vector_weight_decay"):
            if key in group and not (isinstance(group[key], (int, float)) and group[key] >= 0.0):
                raise ValueError(f"Invalid {key} value: {group[key]!r} (must be >= 0)")
        self.rule.validate(group)

    def _fingerprint(self, group_indices: Iterable[int]) -> list[str]:
        lines = [f"{type(self).__name__} rule={self.rule.name} master={self.master_dtype} "
                 f"overlap={self.overlap} comm={self.grad_comm_dtype} bucket_mb={self.bucket_mb} "
                 f"max_grad_norm={self.max_grad_norm} skip_nonfinite={self.skip_nonfinite}"]
        for gi in group_indices:
            group = self.param_groups[gi]
            hyper = {k: (float(v) if isinstance(v, torch.Tensor) else v)
                     for k, v in group.items() if k not in _ENGINE_KEYS}
            lines.append(f"group {gi}: {sorted(hyper.items())}")
            names = group.get("param_names") or [None] * len(group["params"])
            for j, (p, name) in enumerate(zip(group["params"], names)):
                label = name or f"#{j}"
                lines.append(f"group {gi} param {label}: shape {tuple(p.shape)}, dtype {p.dtype}, "
                             f"spectral {spectral.SpectralShape.of(p) if self.uses_spectral_decay else None}")
        return lines

    @torch.no_grad()
    def _build(self, group_indices: Iterable[int]) -> None:
        group_indices = list(group_indices)
        new_params = [p for gi in group_indices for p in self.param_groups[gi]["params"]]
        mesh_group = fsdp.mesh_group(new_params)
        if (mesh_group is not None) != self._presharded and self._built:
            raise ValueError("cannot mix DTensor (FSDP2) parameters with plain ones in one optimizer")
        if mesh_group is not None and not self._built:
            self._presharded = True
            comm = Comm(mesh_group)
            self._comm = comm if comm.world_size > 1 else None
            self.world_size, self.rank = comm.world_size, comm.rank
        if self._comm is not None or self._presharded:
            ablations.check_single_process([self.param_groups[gi] for gi in group_indices], self.world_size,
                                           self._presharded)
        self._ablation_cfg.update({gi: ablations.config(self.param_groups[gi]) for gi in group_indices
                                   if "second_moment" in self.param_groups[gi]})
        if self._presharded:
            return self._build_presharded(group_indices)
        new_slots: list[Slot] = []
        for gi in group_indices:
            for p in self.param_groups[gi]["params"]:
                slot = make_slot(p, len(self._slots), gi, self.world_size, self.rank, self.uses_spectral_decay)
                self._slots.append(slot)
                new_slots.append(slot)
        if self._comm is None:
            for slot in new_slots:
                self._init_local_state(slot)
            return
        self._comm.check_same_everywhere(self._fingerprint(group_indices), "the optimizer's parameter list")
        self._comm.broadcast_tensors([s.param for s in new_slots])  # everyone starts from rank 0's weights
        bucket_bytes = int(self.bucket_mb * 2**20)
        comm_bytes = torch.empty((), dtype=self.grad_comm_dtype).element_size()
        for bucket in pack_buckets(list(reversed(new_slots)), bucket_bytes, self.world_size, comm_bytes):
            self._init_bucket_state(bucket)
            self._buckets.append(bucket)
        if self.overlap:
            self._register_hooks(new_slots)

    def _build_presharded(self, group_indices: list[int]) -> None:
        """FSDP2 parameters: each rank already holds its rows; no buckets, no broadcast, no gathers."""
        if self._comm is not None:
            self._comm.check_same_everywhere(self._fingerprint(group_indices), "the optimizer's parameter list")
        for gi in group_indices:
            for p in self.param_groups[gi]["params"]:
                slot = fsdp.make_slot(p, len(self._slots), gi, self.uses_spectral_decay)
                self._slots.append(slot)
                self._init_local_state(slot)

    def _new_state(self, slot: Slot) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.tensor(0.0)}
        if slot.spectral is not None:
            state["sigma_sq"] = torch.zeros(slot.spectral.heads, dtype=torch.float32, device=slot.param.device)
        return state

    def _init_local_state(self, slot: Slot) -> None:
        """State tensors per parameter (one process, or FSDP2's local rows); the master aliases an fp32
        contiguous parameter instead of copying it."""
        p = fsdp.local_tensor(slot.param.detach())
        state = self._new_state(slot)
        if p.dtype == self.master_dtype and p.is_contiguous():
            state["master_param"] = p.detach().view(-1)
        else:
            state["master_param"] = p.detach().reshape(-1).to(self.master_dtype, copy=True)
        for name in self.rule.state_names:
            state[name] = torch.zeros(p.numel(), dtype=self.master_dtype, device=p.device)
        if slot.spectral is not None:
            state["u"] = torch.ones(slot.local_rows, dtype=self.master_dtype, device=p.device)
        group = self.param_groups[slot.group_index]
        layout = ablations.layout_of(p, group)
        if layout is not None:  # reduced second moment and/or rotation matrices replace the default state
            layout.init_state(state, slot.index, int(group["rotation_seed"]), self.master_dtype, p.device)
            self._ablated[slot.index] = layout
        self.state[slot.param] = state

    def _init_bucket_state(self, bucket: Bucket) -> None:
        """Many ranks: flat per-rank buffers per bucket; per-param state entries are views into them."""
        n, dev = bucket.section_numel, bucket.device
        flat = {"master_param": torch.zeros(n, dtype=self.master_dtype, device=dev)}
        for name in self.rule.state_names:
            flat[name] = torch.zeros(n, dtype=self.master_dtype, device=dev)
        flat["u"] = torch.ones(bucket.u_numel, dtype=self.master_dtype, device=dev)
        self._bucket_state.append(flat)
        for slot in bucket.slots:
            state = self._new_state(slot)
            lo, hi = slot.local_range
            for name, buf in flat.items():
                if name == "u":
                    if slot.spectral is not None:
                        state["u"] = buf[slot.u_offset: slot.u_offset + slot.local_rows]
                    continue
                state[name] = buf[slot.offset: slot.offset + slot.local_numel]
            state["master_param"].copy_(slot.param.detach().reshape(-1)[lo:hi])
            self.state[slot.param] = state

    # ------------------------------------------------------------------ gradients in

    def _check_grads(self) -> None:
        for slot in self._slots:
            g = slot.param.grad
            if g is not None and g.is_sparse:
                raise ValueError(f"parameter #{slot.index} (shape {tuple(slot.param.shape)}) has a sparse "
                                 f"gradient; {type(self).__name__} supports dense gradients only")

    def _launch(self, bi: int) -> None:
        assert self._comm is not None
        bucket, w = self._buckets[bi], self.world_size
        inp = torch.zeros(bucket.section_numel * w, dtype=self.grad_comm_dtype, device=bucket.device)
        for slot in bucket.slots:
            if slot.param.grad is not None:
                scatter_rows(slot.param.grad.reshape(-1), inp, slot, w)
        shard = torch.empty(bucket.section_numel, dtype=self.grad_comm_dtype, device=bucket.device)
        self._pending[bi] = (self._comm.reduce_scatter(shard, inp), shard, inp)

    def _reduce_gradients(self, after_launch: Any = None) -> dict[int, torch.Tensor]:
        """Averaged gradient shards per bucket (launching the buckets the hooks have not, in order).

        At most MAX_IN_FLIGHT staging buffers are launched from here at once, so a step's extra memory
        is a couple of buckets, not a full copy of the gradients. ``after_launch()`` runs once every
        bucket is launched, before the last ones are waited for (every rank reaches it in the same order).
        """
        if self._reduced is None:
            reduced: dict[int, torch.Tensor] = {}

            def finish(bi: int) -> None:
                work, shard, _staging = self._pending.pop(bi)
                work.wait()
                reduced[bi] = shard.to(self.master_dtype).div_(self.world_size)

            for bi in range(len(self._buckets)):
                if bi not in self._pending:
                    while len(self._pending) >= MAX_IN_FLIGHT:
                        finish(min(self._pending))
                    self._launch(bi)
            if after_launch is not None:
                after_launch()
            while self._pending:
                finish(min(self._pending))
            self._ready_slots.clear()
            self._reduced = reduced
        return self._reduced

    def _local_grads(self, after_launch: Any = None) -> list[torch.Tensor | None]:
        """This rank's averaged gradient rows per slot (None: no gradient here), kept until the step ends.

        ``after_launch()`` runs once every reduce-scatter has been issued (ZeRO mode, gradients not yet reduced).
        """
        if self._grads is not None:
            return self._grads
        grads: list[torch.Tensor | None] = [None] * len(self._slots)
        if self._comm is None or self._presharded:
            for s in self._slots:
                if s.param.grad is not None:
                    grads[s.index] = fsdp.local_tensor(s.param.grad).reshape(-1).to(self.master_dtype)
        else:
            reduced = self._reduce_gradients(after_launch)
            for bi, bucket in enumerate(self._buckets):
                for slot in bucket.slots:
                    grads[slot.index] = reduced[bi][slot.offset: slot.offset + slot.local_numel]
        self._grads = grads
        return grads

    def _register_hooks(self, slots: list[Slot]) -> None:
        bucket_of = {s.index: bi for bi, b in enumerate(self._buckets) for s in b.slots}
        for slot in slots:
            if not slot.param.requires_grad:
                continue  # frozen: never gets a gradient; the hook treats it as ready so it holds no bucket back
            self._hook_handles.append(
                slot.param.register_post_accumulate_grad_hook(self._make_hook(slot.index, bucket_of[slot.index]))
            )

    def _make_hook(self, index: int, bi: int):
        def hook(_param: torch.Tensor) -> None:
            if self._no_sync:
                return
            if bi in self._pending or (self._reduced is not None):
                raise RuntimeError(
                    "a gradient arrived after its bucket was already reduced for this step; wrap every "
                    "micro-batch but the last in `with optimizer.no_sync():` when accumulating with overlap=True"
                )
            self._ready_slots.add(index)
            # Launch in bucket order only, so every rank issues the same sequence of collectives.
            for bj in range(len(self._buckets)):
                if bj in self._pending:
                    continue
                if all(s.index in self._ready_slots or not s.param.requires_grad for s in self._buckets[bj].slots):
                    self._launch(bj)
                else:
                    break
        return hook

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (overlap mode launches no reduction inside this block)."""
        previous, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = previous

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._discard_reduced()
        super().zero_grad(set_to_none=set_to_none)

    def _discard_reduced(self) -> None:
        for work, _, _ in self._pending.values():
            work.wait()
        self._pending.clear()
        self._ready_slots.clear()
        self._reduced = None
        self._grads = None

    # ------------------------------------------------------------------ the step

    def _grad_norm_sq(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        present = [g for g in grads if g is not None and g.numel()]
        if not present:
            return torch.zeros((), dtype=torch.float32, device=self._device)
        norms = torch._foreach_norm(present)
        return torch.stack([n.float() for n in norms]).square().sum()

    def _scale_grads(self, grads: list[torch.Tensor | None], coef: torch.Tensor) -> None:
        """Clip the gradients the update will use; with local gradients, ``p.grad`` too (as torch does)."""
        present = [g for g in grads if g is not None]
        if present:
            torch._foreach_mul_(present, coef)
        if self._comm is None or self._presharded:
            for slot, g in zip(self._slots, grads):
                pg = slot.param.grad
                if g is not None and pg is not None and fsdp.local_tensor(pg).data_ptr() != g.data_ptr():
                    pg.mul_(coef.to(pg.dtype))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Average the gradients now, clip them to ``max_norm`` by their true global norm, return the norm.

        The clipped, averaged gradients are kept for the next ``step()``. Collective in distributed mode.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        self._check_grads()
        grads = self._local_grads()
        norm_sq = self._grad_norm_sq(grads)
        if self._comm is not None:
            self._comm.all_reduce(norm_sq)
        norm = norm_sq.sqrt()
        self._scale_grads(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        self.last_grad_norm = norm
        return norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        self._adopt_edited_params()
        # weight_decay == 0 switches spectral decay off entirely for the group: no power iteration either
        spectral_slots = [s for s in self._slots
                          if s.spectral is not None and float(self.param_groups[s.group_index]["weight_decay"]) != 0]

        # One SUM all-reduce: [grad norm^2, has-grad flags, W^T u partials of every matrix]. Without the
        # norm it needs no reduced gradient, so it is issued right after the last bucket's reduce-scatter
        # and its latency hides behind theirs.
        need_norm = self.max_grad_norm is not None or self.skip_nonfinite
        flags = torch.tensor([s.param.grad is not None for s in self._slots], dtype=torch.float32,
                             device=self._device)
        parts = [flags.new_zeros(1), flags] + [self._partial_wtu(slot).reshape(-1) for slot in spectral_slots]
        launched: list[Any] = []
        # early: ZeRO mode with the gradients still to reduce (FSDP2 hands them over already reduced)
        early = self._comm is not None and not self._presharded and self._grads is None and not need_norm

        def launch_control() -> None:
            assert self._comm is not None
            vector = torch.cat(parts)
            launched.append((self._comm.all_reduce(vector, async_op=True), vector))

        grads = self._local_grads(after_launch=launch_control if early else None)
        if early:  # _local_grads ran launch_control exactly once
            work, control = launched[0]
            work.wait()
        else:
            if need_norm:
                parts[0] = self._grad_norm_sq(grads).reshape(1)
            control = torch.cat(parts)
            if self._comm is not None:
                self._comm.all_reduce(control)
        active = (control[1: 1 + len(self._slots)] > 0).tolist()

        if need_norm:
            norm = control[0].sqrt()
            self.last_grad_norm = norm
            if self.skip_nonfinite and not bool(torch.isfinite(norm)):
                self.skipped_steps += 1
                self._discard_reduced()
                return loss
            if self.max_grad_norm is not None:
                self._scale_grads(grads, (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))

        wtu: dict[int, torch.Tensor] = {}
        offset = 1 + len(self._slots)
        for slot in spectral_slots:
            assert slot.spectral is not None
            n = slot.spectral.heads * slot.spectral.cols
            wtu[slot.index] = control[offset: offset + n].view(slot.spectral.heads, slot.spectral.cols)
            offset += n

        for gi, group in enumerate(self.param_groups):
            slots = [s for s in self._slots if s.group_index == gi and active[s.index]]
            if slots:
                self._update_group(group, slots, grads, wtu)
        del grads
        self._discard_reduced()  # free the gradient shards before the all-gather buffers exist
        self._write_back()
        return loss

    def _partial_wtu(self, slot: Slot) -> torch.Tensor:
        shape = slot.spectral
        assert shape is not None
        state = self.state[slot.param]
        out = torch.zeros(shape.heads, shape.cols, dtype=torch.float32, device=self._device)
        rows = state["master_param"].view(-1, shape.cols)
        spectral.partial_wtu(rows.float(), state["u"].float(), slot.row_start, shape, out)
        return out

    def _update_group(self, group: dict[str, Any], slots: list[Slot], grads: list[torch.Tensor | None],
                      wtu: dict[int, torch.Tensor]) -> None:
        lr = float(group["lr"])
        states = [self.state[s.param] for s in slots]
        for st in states:
            st["step"] += 1
        steps = [float(st["step"]) for st in states]
        decays = [self._decay(group, slot, st, wtu, lr) for slot, st in zip(slots, states)]

        if self._ablation_cfg:  # AdamATan2/AdamW: second_moment/rotate ablations (adams_dist/ablations.py)
            ablations.check_unchanged(group, self._ablation_cfg[slots[0].group_index])
            if self._ablated:  # their params take a per-tensor path; the rest goes on below as usual
                for slot, st, t, decay in zip(slots, states, steps, decays):
                    if slot.index in self._ablated:
                        decay.apply_(st["master_param"])
                        self._ablated[slot.index].update(self.rule.name, st, grads[slot.index], t, group, lr)
                keep = [i for i, s in enumerate(slots) if s.index not in self._ablated]
                slots, states = [slots[i] for i in keep], [states[i] for i in keep]
                steps, decays = [steps[i] for i in keep], [decays[i] for i in keep]
                if not slots:
                    return

        masters = [st["master_param"] for st in states]
        gs = [grads[s.index] for s in slots]
        full = [g if g is not None else torch.zeros_like(m) for g, m in zip(gs, masters)]
        rule_state = {name: [st[name] for st in states] for name in self.rule.state_names}
        compiled = self.kernel_path == "compiled"
        ok = self.rule.apply(masters, full, rule_state, steps, group, lr, self._reduce_min, decays,
                             compiled=compiled, strict=self.kernel == "compiled")
        if compiled and not ok:  # a broken toolchain must not stop training when the user did not ask for it
            self.kernel = "foreach"

    def _decay(self, group: dict[str, Any], slot: Slot, state: dict[str, Any], wtu: dict[int, torch.Tensor],
               lr: float) -> rules.Decay:
        """This step's decoupled decay of one parameter; its power step (``u <- W v``) runs here."""
        if not self.uses_spectral_decay:
            return rules.Decay(keep=1.0 - lr * float(group.get("weight_decay", 0.0)))
        if slot.spectral is None:
            return rules.Decay(keep=1.0 - lr * float(group["scalar_vector_weight_decay"]))
        wd = float(group["weight_decay"])
        if wd == 0.0:  # spectral decay off for the group: no power iteration either
            return rules.NO_DECAY
        shape = slot.spectral
        v, dead = spectral.normalize_heads(wtu[slot.index])
        runs = spectral.power_rows(state["master_param"].view(-1, shape.cols), state["u"], slot.row_start, shape,
                                   v, dead, state["sigma_sq"])
        return rules.Decay(coef=lr * wd * math.sqrt(shape.rows), cols=shape.cols, runs=runs)

    @property
    def kernel_path(self) -> str:
        """"compiled" or "foreach": the path the element-wise update takes on this device."""
        return self.rule.kernel_path(self._device or torch.device("cpu"), self.kernel)

    def _reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=self._device, dtype=torch.float64)
        if self._comm is not None:
            self._comm.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.cpu()

    # ------------------------------------------------------------------ parameters out

    def _record_versions(self) -> None:
        self._versions = {s.index: fsdp.local_tensor(s.param)._version for s in self._slots}

    def _adopt_edited_params(self) -> None:
        """Take in parameters the user changed since our last write (e.g. loaded weights) as masters."""
        for slot in self._slots:
            local = fsdp.local_tensor(slot.param)
            if local._version != self._versions.get(slot.index):
                master = self.state[slot.param]["master_param"]
                if master.data_ptr() != local.data_ptr():
                    master.copy_(self._local_rows_of(slot, slot.param.detach()))

    def _write_back(self) -> None:
        self._write_params()
        self._record_versions()

    def _write_params(self) -> None:
        if self._comm is None or self._presharded:
            for slot in self._slots:
                p, master = fsdp.local_tensor(slot.param.detach()), self.state[slot.param]["master_param"]
                if master.data_ptr() != p.data_ptr() or p.dtype != master.dtype:
                    p.copy_(master.view(p.shape))
            return
        in_flight: list[tuple[Any, torch.Tensor, torch.Tensor, Bucket]] = []
        for bucket, flat in zip(self._buckets, self._bucket_state):
            send = flat["master_param"].to(bucket.dtype)
            out = torch.empty(bucket.section_numel * self.world_size, dtype=bucket.dtype, device=bucket.device)
            in_flight.append((self._comm.all_gather(out, send), out, send, bucket))
            if len(in_flight) >= MAX_IN_FLIGHT:
                self._unpack(*in_flight.pop(0))
        for gather in in_flight:
            self._unpack(*gather)

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

    @torch.no_grad()
    def broadcast_buffers(self, buffers: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values of ``buffers`` (e.g. ``model.buffers()``) to every rank."""
        buffers = list(buffers)
        if self._comm is not None:
            self._comm.broadcast_tensors(buffers)

    def _local_rows_of(self, slot: Slot, full: torch.Tensor) -> torch.Tensor:
        """This rank's flat rows of a parameter-shaped tensor (full tensor or DTensor)."""
        if fsdp.is_dtensor(full):
            if self._presharded:
                return fsdp.local_tensor(full).reshape(-1)
            full = full.full_tensor()  # type: ignore[attr-defined]
        lo, hi = slot.local_range
        return full.reshape(-1)[lo:hi]

    # ------------------------------------------------------------------ introspection

    @torch.no_grad()
    def spectral_sigmas(self) -> dict[torch.Tensor, torch.Tensor]:
        """Latest spectral-norm estimate per matrix (one value per head). Collective when distributed."""
        slots = [s for s in self._slots if s.spectral is not None]
        if not slots:
            return {}
        sq = torch.cat([self.state[s.param]["sigma_sq"] for s in slots])
        if self._comm is not None:
            self._comm.all_reduce(sq)
        out, offset = {}, 0
        for s in slots:
            assert s.spectral is not None
            out[s.param] = sq[offset: offset + s.spectral.heads].sqrt()
            offset += s.spectral.heads
        return out

    @property
    def collectives_issued(self) -> int:
        return self._comm.collectives if self._comm else 0

    @property
    def bytes_sent(self) -> int:
        return self._comm.bytes_sent if self._comm else 0

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (master copies, moments, u)."""
        seen: set[int] = set()
        total = 0
        for slot in self._slots:
            for name, t in self.state[slot.param].items():
                if not isinstance(t, torch.Tensor) or name == "step":
                    continue
                if name == "master_param" and t.data_ptr() == slot.param.data_ptr():
                    continue  # aliases the parameter itself
                key = t.data_ptr()
                if key in seen and t.numel():
                    continue
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ state dicts

    def _gathered_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every parameter's whole (unsharded) per-row state, flat, on every rank."""
        names = ("master_param", *self.rule.state_names)
        full: dict[int, dict[str, torch.Tensor]] = {s.index: {} for s in self._slots}
        if self._presharded:  # DTensors laid out like the parameters: torch.distributed.checkpoint reshards them
            for slot in self._slots:
                for name in (*names, "u") if slot.spectral is not None else names:
                    local = self.state[slot.param][name].detach().clone()
                    full[slot.index][name] = fsdp.like_param(slot.param, local, per_row=name == "u")
            return full
        if self._comm is None:
            for slot in self._slots:
                for name in (*names, "u") if slot.spectral is not None else names:
                    full[slot.index][name] = self.state[slot.param][name].detach().clone()
            return full
        w = self.world_size
        for bucket, flat in zip(self._buckets, self._bucket_state):
            for name in (*names, "u"):
                buf = flat[name]
                out = torch.empty(buf.numel() * w, dtype=buf.dtype, device=buf.device)
                self._comm.all_gather(out, buf).wait()
                for slot in bucket.slots:
                    if name == "u":
                        if slot.spectral is not None:
                            rows = out.view(w, -1)[:, slot.u_offset: slot.u_offset + slot.rows_per_rank]
                            full[slot.index]["u"] = rows.reshape(-1)[: slot.rows].clone()
                        continue
                    t = torch.empty(slot.param.numel(), dtype=buf.dtype, device=buf.device)
                    gather_rows(out, slot, w, t)
                    full[slot.index][name] = t
        return full

    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:
        """Full, unsharded state (identical on every rank; collective when distributed).

        Loads at any world size. For large models prefer the sharded checkpoint API.
        """
        full = self._gathered_state()
        sigmas = self.spectral_sigmas()
        state: dict[int, dict[str, Any]] = {}
        for slot in self._slots:
            p = slot.param
            entry: dict[str, Any] = {"step": self.state[p]["step"].clone()}
            layout = self._ablated.get(slot.index)
            for name, t in full[slot.index].items():
                if layout is not None and name in layout.saved_shapes:
                    continue  # reduced second moment: exported below
                entry[name] = t if fsdp.is_dtensor(t) else t.view(p.shape[:-1] if name == "u" else p.shape)
            if layout is not None:
                entry.update(layout.export(self.state[p]))
            if p in sigmas:
                entry["sigma"] = sigmas[p].clone()
            state[slot.index] = entry
        groups = []
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = [self._index_of(p) for p in group["params"]]
            groups.append(copy.deepcopy(g))
        return {"state": state, "param_groups": groups}

    def _index_of(self, p: torch.Tensor) -> int:
        for slot in self._slots:
            if slot.param is p:
                return slot.index
        raise KeyError("parameter not managed by this optimizer")

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` of a run at any world size. Validates before changing anything."""
        self._validate_state_dict(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for k, v in saved.items():
                if k not in ("params", "param_names"):
                    group[k] = copy.deepcopy(v)
        saved_ids = self._saved_ids(state_dict)
        for slot in self._slots:
            entry = state_dict["state"][saved_ids[slot.index]]
            state = self.state[slot.param]
            state["step"].copy_(torch.as_tensor(entry["step"]))
            layout = self._ablated.get(slot.index)
            for name in ("master_param", *self.rule.state_names):
                if layout is None or name not in layout.saved_shapes:
                    state[name].copy_(self._local_rows_of(slot, entry[name]))
            if layout is not None:
                layout.load(state, entry)
            if slot.spectral is not None:
                u = entry["u"]
                if fsdp.is_dtensor(u) and self._presharded:
                    state["u"].copy_(fsdp.local_tensor(u).reshape(-1))
                else:
                    u = u.full_tensor() if fsdp.is_dtensor(u) else u
                    state["u"].copy_(u.reshape(-1)[slot.row_start: slot.row_start + slot.local_rows])
                sigma = entry.get("sigma")
                state["sigma_sq"].zero_()
                if sigma is not None and self.rank == 0:
                    state["sigma_sq"].copy_(torch.as_tensor(sigma).square())
        self._write_back()
        self._discard_reduced()

    def _validate_state_dict(self, sd: Any) -> None:
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}")
        for gi, (mine, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param group {gi}: state dict has {len(saved['params'])} params, "
                                 f"this optimizer has {len(mine['params'])}")
            if "second_moment" in mine:
                ablations.check_same_config(mine, saved, gi)
        required = ("step", "master_param", *self.rule.state_names)
        saved_ids = self._saved_ids(sd)
        for slot in self._slots:
            entry = sd["state"].get(saved_ids[slot.index])
            where = f"parameter #{slot.index} (shape {tuple(slot.param.shape)})"
            if entry is None:
                raise ValueError(f"state dict has no state for {where}")
            layout = self._ablated.get(slot.index)
            for name in required:
                if name not in entry:
                    raise ValueError(f"state dict entry for {where} lacks '{name}'")
                if layout is not None and name in layout.saved_shapes:
                    continue  # checked by layout.validate below
                if name != "step" and tuple(entry[name].shape) != tuple(slot.param.shape):
                    raise ValueError(f"state dict '{name}' for {where} has shape {tuple(entry[name].shape)}")
            if layout is not None:
                layout.validate(entry, where)
            if slot.spectral is not None:
                if "u" not in entry or entry["u"].numel() != slot.rows:
                    raise ValueError(f"state dict entry for {where} lacks a matching spectral 'u'")
                sigma = entry.get("sigma")
                if sigma is not None and torch.as_tensor(sigma).numel() != slot.spectral.heads:
                    raise ValueError(f"state dict 'sigma' for {where} has {torch.as_tensor(sigma).numel()} heads, "
                                     f"this optimizer has {slot.spectral.heads} (was set_heads applied the same way?)")

    @staticmethod
    def _saved_ids(sd: dict[str, Any]) -> list[Any]:
        """State keys in parameter order, read from the saved groups (as torch.optim does)."""
        return [pid for group in sd["param_groups"] for pid in group["params"]]

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedOptimizer:
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_comm":
                new.__dict__[key] = value  # the process group is shared, not copied
            elif key == "_hook_handles":
                new.__dict__[key] = []
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        if new._comm is not None and new.overlap:
            new._register_hooks(new._slots)
        new._record_versions()  # copied tensors restart their version counters
        return new

    def __getstate__(self) -> dict[str, Any]:
        if self._comm is not None:
            raise TypeError("a distributed optimizer cannot be pickled; save state_dict() or a checkpoint")
        state = dict(self.__dict__)
        state["_hook_handles"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_slots" in state:
            self._record_versions()
