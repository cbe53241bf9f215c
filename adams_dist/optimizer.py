"""The engine: one torch.optim.Optimizer for one process or many, parameterised by an update rule.

A step reads top-down: (1) gradients in: this rank's averaged gradient rows (``shards``: a
reduce-scatter per bucket under ZeRO, or the local gradient); (2) one small all-reduce
(``control``) of the gradient-norm partial, which params got a gradient anywhere, and the spectral
``W^T u`` partials; (3) decay (``decay``) and (4) the rule update of this rank's master rows
(``update``, running ``rules``); (5) parameters out: updated rows written back (all-gathered under ZeRO).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from . import ablations, ddp, decay, fsdp, gradients, state_io, update, validation
from .comm import DEFAULT_TIMEOUT
from .control import Control, agreement_values
from .layout import Slot
from .rules import Rule
from .rules.background import BackgroundBuilds
from .shards import Shards, make_shards
from .storage import Storage


class ShardedOptimizer(Optimizer):
    """Shared engine of every optimizer in the package. Subclasses choose the rule and defaults."""

    rule: Rule
    uses_spectral_decay = False  # Adams: spectral decay on matrices, scalar decay on the rest
    _step_supports_amp_scaling = True  # torch's GradScaler hands step() grad_scale and found_inf
    _shards: Shards  # the sharding mode, chosen at the first build from the parameters and the process group

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        master_dtype: torch.dtype | None = torch.float32,
        moment_dtype: torch.dtype | str | None = None,
        process_group: Any | None = None,
        bucket_mb: float = 32.0,
        overlap: bool = False,
        grad_comm_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        kernel: str = "auto",
        collective_timeout: float = DEFAULT_TIMEOUT,
        rounding_seed: int = 0,
        master_remainder: bool = False,
        **unknown: Any,
    ):
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {sorted(unknown)}; engine "
                            "options are master_dtype, moment_dtype, process_group, bucket_mb, overlap, "
                            "grad_comm_dtype, max_grad_norm, skip_nonfinite, kernel, collective_timeout, "
                            "rounding_seed, master_remainder")
        kernel = validation.check_engine_options(master_dtype, bucket_mb, grad_comm_dtype, max_grad_norm, kernel,
                                                 collective_timeout)
        self.collective_timeout = float(collective_timeout)
        self.kernel = kernel
        self._builds: BackgroundBuilds | None = None  # kernel="background": created at the first step
        self.storage = Storage.of(master_dtype, moment_dtype, master_remainder, rounding_seed, self.rule)
        self.bucket_mb = float(bucket_mb)
        self.overlap = bool(overlap)
        self.grad_comm_dtype = grad_comm_dtype or torch.float32
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.last_grad_norm: torch.Tensor | None = None
        self.skipped_steps = 0
        self.found_inf_anywhere: torch.Tensor | None = None  # 1 when a GradScaler's found-inf was set on any rank
        self._process_group = process_group
        self._device: torch.device | None = None
        self._steps_taken = 0  # step() calls, for error messages
        self._consolidated: tuple[int, dict[str, Any]] | None = None  # (steps taken, state dict) on the target
        # second_moment/rotate ablations (adams_dist/ablations.py, AdamATan2/AdamW, one process only):
        self._ablated: dict[int, ablations.Layout] = {}  # slot index -> layout, for params off the usual path
        self._ablation_cfg: dict[int, ablations.Config] = {}  # group index -> options the state was built for
        super().__init__(params, defaults)
        self._build(range(len(self.param_groups)))

    # The storage options (storage.py), readable on the optimizer as its other options are.
    master_dtype = property(lambda self: self.storage.master_dtype)
    compute_dtype = property(lambda self: self.storage.compute_dtype)
    moment_dtype = property(lambda self: self.storage.moment_dtype)
    master_remainder = property(lambda self: self.storage.master_remainder)
    rounding_seed = property(lambda self: self.storage.rounding_seed)

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered collection of Tensors, not a set")
        else:
            params = list(params)
        self._device = validation.check_params(params, self.param_groups, self._device)
        param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        try:
            validation.check_group(self.param_groups[-1], self.rule, "second_moment" in self.defaults)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        if hasattr(self, "_shards"):  # a group added after construction
            self._build([len(self.param_groups) - 1])

    @torch.no_grad()
    def _build(self, group_indices: Iterable[int]) -> None:
        group_indices = list(group_indices)
        groups = [self.param_groups[gi] for gi in group_indices]
        new_params = [p for g in groups for p in g["params"]]
        if not hasattr(self, "_shards"):
            self._shards = make_shards(new_params, self._process_group, self.storage.dtypes(self.rule.state_names),
                                       self.compute_dtype, self.bucket_mb, self.grad_comm_dtype, self.overlap,
                                       self.collective_timeout)
        elif (fsdp.mesh_group(new_params) is not None) != self._shards.takes_dtensors:
            raise ValueError("cannot mix DTensor (FSDP2) parameters with plain ones in one optimizer")
        shards = self._shards
        ablations.check_single_process(groups, shards.sharded)
        self.storage.check(groups, new_params)
        self._ablation_cfg.update({gi: ablations.config(self.param_groups[gi]) for gi in group_indices
                                   if "second_moment" in self.param_groups[gi]})
        pairs = [(gi, p) for gi in group_indices for p in self.param_groups[gi]["params"]]
        for slot in shards.add(pairs, self.uses_spectral_decay, validation.fingerprint(self, group_indices)):
            state: dict[str, Any] = {"step": torch.tensor(0.0), **shards.state_of(slot)}
            if slot.spectral is not None:
                state["sigma_sq"] = torch.zeros(slot.spectral.heads, dtype=torch.float32, device=slot.param.device)
            group = self.param_groups[slot.group_index]
            layout = ablations.layout_of(slot.param, group)
            if layout is not None:  # reduced second moment and/or rotation matrices replace the default state
                layout.init_state(state, slot.index, int(group["rotation_seed"]), self.compute_dtype,
                                  slot.param.device)
                self._ablated[slot.index] = layout
            self.state[slot.param] = state
        shards.record_versions()

    @property
    def _slots(self) -> list[Slot]:
        return self._shards.slots

    @property
    def process_group(self) -> Any | None:
        """The process group the state is sharded over (None in one process)."""
        return self._shards.comm.group if self._shards.comm else None

    @property
    def world_size(self) -> int:
        return self._shards.world_size

    @property
    def rank(self) -> int:
        return self._shards.rank

    @property
    def device(self) -> torch.device:
        """The device every parameter and all optimizer state live on."""
        return self._device or torch.device("cpu")

    # ------------------------------------------------------------------ gradients in

    def _check_grads(self) -> None:
        for slot in self._slots:
            g = slot.param.grad
            if g is not None and g.is_sparse:
                raise ValueError(f"parameter #{slot.index} (shape {tuple(slot.param.shape)}) has a sparse "
                                 f"gradient; {type(self).__name__} supports dense gradients only")

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (overlap mode launches no reduction inside this block)."""
        previous, self._shards.accumulating = self._shards.accumulating, True
        try:
            yield
        finally:
            self._shards.accumulating = previous

    @torch.compiler.disable  # see step()
    def zero_grad(self, set_to_none: bool = True) -> None:
        # Reductions already launched stay in flight: step() sees the edit on any rank and every rank
        # reduces again, so no rank issues a collective the others do not.
        self._shards.zero_grads += 1
        super().zero_grad(set_to_none=set_to_none)

    @torch.compiler.disable  # see step()
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Average the gradients now, clip them to ``max_norm`` by their true global norm, return the norm.

        The clipped, averaged gradients are kept for the next ``step()``. Collective in distributed mode.
        With a GradScaler, call ``scaler.unscale_(optimizer)`` first, as for any optimizer.
        """
        return gradients.clip(self, max_norm)

    # ------------------------------------------------------------------ the step

    # A compiler boundary: inside a torch.compile'd train step, Dynamo runs step() as it is instead of
    # tracing its collectives and Python decisions (which would recompile every step). The update runs
    # its own compiled kernels (kernel="compiled").
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shards = self._shards
        self._steps_taken += 1
        if self._steps_taken == 1 and shards.world_size > 1:
            ddp.warn_if_allreducing(self)  # DDP's all-reduce on top of ours would double the traffic
        shards.set_context(f"step {self._steps_taken}")
        self._check_grads()
        shards.adopt_edits(self.state)

        # Gradients in, and the control all-reduce (norm, has-grad flags, W^T u partials, agreement).
        control = self._control_partials()
        grads = gradients.averaged(self, control)
        if self._builds is not None:  # compiled kernels only once every rank has built them
            self._builds.begin_step(allowed=not control.any_builds)
        if control.any_found_inf:  # a GradScaler found inf/NaN on some rank: every rank skips
            return self._skip(loss)
        if self.max_grad_norm is not None or self.skip_nonfinite:
            norm = control.grad_norm_sq[0].sqrt()
            self.last_grad_norm = norm
            if self.skip_nonfinite and not math.isfinite(control.grad_norm_sq_host):
                return self._skip(loss)
            if self.max_grad_norm is not None:
                shards.scale_grads(grads, (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))

        # Decay and the rule update, per group, of the params that got a gradient on some rank.
        active = [s for s in self._slots if control.active[s.index]]
        wv = decay.split_products(active, lambda s: self.storage.wide_master(self.state[s.param])["master_param"],
                                  control.wtu, shards)  # matrices split by columns: their W v, summed
        for gi, group in enumerate(self.param_groups):
            slots = [s for s in active if s.group_index == gi]
            if slots:
                update.update_group(self, group, slots, grads, control.wtu, wv)
        del grads
        shards.discard()  # free the gradient shards before the all-gather buffers exist

        # Parameters out.
        shards.write_back(self.state)
        return loss

    def _skip(self, loss: Any) -> Any:
        self.skipped_steps += 1
        self._shards.discard()
        return loss

    def _control_partials(self) -> Control:
        """This rank's has-grad flags, ``W^T u`` partials (spectral decay off when weight_decay == 0) and
        the counts every rank must agree on."""
        flags = torch.tensor([s.param.grad is not None for s in self._slots], dtype=torch.float32,
                             device=self.device)
        wtu = {s.index: decay.wtu_partial(s, self.storage.wide_master(self.state[s.param]))
               for s in self._slots
               if s.spectral is not None and float(self.param_groups[s.group_index]["weight_decay"]) != 0}
        control = Control(flags, wtu, self._agreement_values())
        if self.kernel_path == "background":
            self._builds = self._builds or BackgroundBuilds()
            control.builds.fill_(float(self._builds.pending))
        return control

    def _agreement_values(self, readable: bool = False) -> dict[str, Any]:
        return agreement_values(self._shards.backward_passes, self._shards.zero_grads, self.param_groups, readable)

    @property
    def kernel_path(self) -> str:
        """"compiled" or "foreach": the path the element-wise update takes on this device."""
        return self.rule.kernel_path(self.device, self.kernel)

    # ------------------------------------------------------------------ parameters out

    @torch.no_grad()
    def broadcast_buffers(self, buffers: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values of ``buffers`` (e.g. ``model.buffers()``) to every rank."""
        self._shards.broadcast(list(buffers))

    # ------------------------------------------------------------------ introspection

    @torch.no_grad()
    def spectral_sigmas(self) -> dict[torch.Tensor, torch.Tensor]:
        """Latest spectral-norm estimate per matrix (one value per head). Collective when distributed."""
        return decay.sigmas(self._slots, self.state, self._shards)

    @property
    def collectives_issued(self) -> int:
        return self._shards.comm.collectives if self._shards.comm else 0

    @property
    def bytes_sent(self) -> int:
        return self._shards.comm.bytes_sent if self._shards.comm else 0

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (master copies, moments, u)."""
        return self._shards.state_bytes(self.state)

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict[str, Any]:
        """Full, unsharded state; loads at any world size. For large models prefer the sharded checkpoint API.

        Collective when distributed: every rank calls it and gets the same dict. To save from one rank,
        call ``consolidate_state_dict(to=0)`` on every rank, then ``state_dict()`` on rank 0 alone.
        """
        if self._consolidated is not None and self._consolidated[0] == self._steps_taken:
            return self._consolidated[1]
        self._shards.set_context("state_dict(), a collective: call it on every rank, or call "
                                 "consolidate_state_dict(to=0) on every rank and then state_dict() on rank 0 alone")
        return state_io.state_dict(self)

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's part of the state, for ``torch.distributed.checkpoint`` (see ``save_sharded_optimizer``).

        Where the state is split over ranks its tensors are DTensors of each rank's rows, shaped (rows, row
        length) whatever the parameter's shape; DCP writes every row once and, loading into this dict built at
        another world size, reads each rank's rows. ``load_state_dict`` takes the loaded dict. No rank holds
        more than its own rows. Collective when distributed (one small all-reduce of the spectral norms).
        """
        self._shards.set_context("sharded_state_dict(), a collective: call it on every rank")
        return state_io.state_dict(self, sharded=True)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective: gather the full state onto rank ``to``, whose ``state_dict()`` then returns it without
        communicating until the next step (torch's ZeroRedundancyOptimizer protocol)."""
        if not (isinstance(to, int) and 0 <= to < self.world_size):
            raise ValueError(f"to must be a rank in [0, {self.world_size}), got {to!r}")
        self._shards.set_context(f"consolidate_state_dict(to={to})")
        full = state_io.state_dict(self)
        self._consolidated = (self._steps_taken, full) if self.rank == to else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` of a run at any world size, or one read by DCP into
        ``sharded_state_dict()``. Validates before changing anything."""
        self._consolidated = None
        state_io.load_state_dict(self, state_dict)

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise ValueError naming the first thing in ``state_dict`` that does not fit; changes nothing."""
        state_io.validate_state_dict(self, state_dict)

    # ------------------------------------------------------------------ copying

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)  # the shards refuse to be pickled when distributed

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
