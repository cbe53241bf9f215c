"""An element-wise rule is one function; its compiled, eager and small-tensor paths are derived from it.

``rule_fn(lr=, step=, **hyperparams)`` does this step's scalar math in Python and returns
``update(g, *state) -> delta``, the update of one tensor: it changes the state tensors in place and
returns what to add to the parameter. ``update`` must be element-wise (each output element depends
only on the same element of its inputs) and use ``rules.atan2`` rather than ``torch.atan2``. From it:

- compiled (``kernel="compiled"``, tensors of at least ``COMPILED_MIN_NUMEL`` elements): one fused
  kernel per tensor, ``p = keep*p + delta`` or, under spectral decay, ``p - coef*(W v) v^T + delta``;
- eager, large tensors: ``update`` over fixed-size chunks, so its temporaries stay small and in cache
  instead of making full-size passes over memory;
- eager, small tensors: concatenated into one flat tensor per state and updated in one call, so the
  per-op cost is paid once per group instead of once per tensor.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import spectral
from ..decay import NO_DECAY, Decay
from .background import BackgroundBuilds
from .base import Rule, Tensors, apply_decays, widened
from .compiled import COMPILED_MIN_NUMEL, compiled_kernel, without_bases

_STEP_ARGS = ("lr", "step")
# Elements per eager chunk and CPU thread: 512 KB per tensor, a few MB with the temporaries, so they
# stay in cache. Measured on one core: 1 << 16 is 2-9% faster at 2e7 params but up to 10% slower at
# 2e6 (where per-op overhead shows); 1 << 18 loses the gain at 2e7.
CHUNK_PER_THREAD = 1 << 17


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view (the engine's shards already are one)."""
    return t if t.dim() == 1 else t.view(-1)


def _chunk_numel(p: torch.Tensor) -> int:
    if p.device.type != "cpu":  # accelerators: no cache to stay in, and a launch per op costs more
        return p.numel()
    return CHUNK_PER_THREAD * max(1, torch.get_num_threads())


def add_in_chunks(p: torch.Tensor, tensors: Sequence[torch.Tensor], delta: Callable[..., torch.Tensor],
                  keep: float = 1.0, whole: bool = False) -> None:
    """``p = keep*p + delta(*tensors)`` over flat tensors, one cache-sized chunk at a time (``whole``: in one
    piece; the same arithmetic, a tenth of the torch calls)."""
    size = p.numel() if whole else _chunk_numel(p)
    for part, *chunks in zip(*(t.split(size) for t in (p, *tensors))):
        torch.add(delta(*chunks), part, alpha=keep, out=part)  # delta + keep*p in one pass


class ElementwiseRule(Rule):
    """A rule given as ``rule_fn`` (see the module docstring) and the names of its state tensors.

    The hyperparameters are ``rule_fn``'s arguments besides ``lr`` and ``step``; the ones without a
    default must be in every param group.
    """

    compilable = True

    def __init__(self, name: str, rule_fn: Callable[..., Callable[..., torch.Tensor]], state_names: Sequence[str]):
        args = inspect.signature(rule_fn).parameters.values()
        if any(a.kind in (a.POSITIONAL_ONLY, a.VAR_POSITIONAL, a.VAR_KEYWORD) for a in args):
            raise TypeError(f"{name}: rule_fn takes named arguments only (lr, step, hyperparameters)")
        self.name = name
        self.rule_fn = rule_fn
        self.state_names = tuple(state_names)
        self.takes = tuple(a.name for a in args if a.name in _STEP_ARGS)
        self.hyperparams = tuple(a.name for a in args if a.name not in _STEP_ARGS)
        self.defaults = {a.name: a.default for a in args if a.default is not inspect.Parameter.empty}
        self.required = tuple(k for k in self.hyperparams if k not in self.defaults)

    def make_update(self, group: dict[str, Any], lr: float, step: float,
                    widen_to: torch.dtype | None = None) -> Callable[..., torch.Tensor]:
        """This step's ``update(g, *state)`` for one tensor of ``group``; ``widen_to``: the dtype it
        computes in when the state is stored in a narrower one."""
        given = {"lr": lr, "step": step}
        hyper = {k: group[k] for k in self.hyperparams if k in group}
        update = self.rule_fn(**{k: given[k] for k in self.takes}, **hyper)
        return update if widen_to is None else widened(update, widen_to)

    def apply(self, params, grads, state, steps, group, lr, reduce_min, decays, compiled=False, strict=False):
        tensors = [(g, *(state[name][i] for name in self.state_names)) for i, g in enumerate(grads)]
        narrow = any(t.dtype != params[0].dtype for t in tensors[0][1:]) if tensors else False
        widen_to = params[0].dtype if narrow else None
        small, kernel_ok = [], True
        updates: dict[float, Callable[..., torch.Tensor]] = {}  # one per step count (usually one in all)
        for i, p in enumerate(params):
            if p.numel() < COMPILED_MIN_NUMEL:
                small.append(i)
                continue
            if steps[i] not in updates:
                updates[steps[i]] = self.make_update(group, lr, steps[i], widen_to)
            kernel_ok = self.update_large(p, tensors[i], decays[i], updates[steps[i]], compiled if kernel_ok else False,
                                          strict)
        if small:
            pick = lambda ts: [ts[i] for i in small]  # noqa: E731
            self.update_small(pick(params), pick(tensors), pick(list(steps)), pick(list(decays)), group, lr, widen_to)
        return kernel_ok or not compiled

    def update_large(self, p: torch.Tensor, tensors: tuple[torch.Tensor, ...], decay: Decay,
                     update: Callable[..., torch.Tensor], compiled: bool | BackgroundBuilds, strict: bool) -> bool:
        """Decay + update of one big tensor, piece by piece (one piece per run of heads under spectral
        decay). ``compiled``: the compiled kernels, or those ``BackgroundBuilds`` has ready. Returns whether
        the compiled kernels are still in use."""
        # (piece of p, the same piece of g and the state, its (W v, v^T) under spectral decay)
        pieces: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor] | None]]
        pieces = [(p, tensors, None)]
        if decay.columns is not None:  # column heads: the rank-1 decay on a strided view, then the update
            decay.apply_(p)
            decay = NO_DECAY
        if decay.rank1:
            if decay.keep != 1.0:
                p.mul_(decay.keep)
            pieces = []
            for lo, hi, wv, vt in decay.runs:
                n, cols = wv.shape[0], decay.cols
                view = lambda t: t[lo * cols: hi * cols].view(n, -1, cols)  # noqa: E731
                pieces.append((view(p), tuple(view(t) for t in tensors), (wv, vt)))
        for piece, views, rank1 in pieces:
            if compiled:
                kind = (self.name, self.rule_fn, rank1 is not None)
                make_kernel = functools.partial(compiled_kernel, *kind)
                args = without_bases((piece, views, *rank1, decay.coef, update) if rank1
                                     else (piece, views, decay.keep, update))
                try:
                    if not isinstance(compiled, BackgroundBuilds):
                        make_kernel()(*args)
                        continue
                    if compiled.run(kind, make_kernel, update, args):
                        continue
                except Exception as err:  # build errors surface before the kernel touches any tensor
                    if strict:
                        raise RuntimeError(f"kernel='compiled' was requested but torch.compile failed: {err}") from err
                    warnings.warn(f"{self.name} rule: compiled kernel unavailable ({type(err).__name__}: {err}); "
                                  "running the same update through the eager path", RuntimeWarning, stacklevel=4)
                    compiled = False
            if rank1 is not None:
                spectral.rank1_(piece, rank1[0], rank1[1], decay.coef)
            # while kernels build in a thread, each torch call may wait for the interpreter lock: make fewer
            whole = isinstance(compiled, BackgroundBuilds) and compiled.building
            add_in_chunks(piece.view(-1), [t.view(-1) for t in views], update, 1.0 if rank1 else decay.keep, whole)
        return compiled is not False

    def update_small(self, params: Tensors, tensors: Sequence[tuple[torch.Tensor, ...]], steps: Sequence[float],
                     decays: Sequence[Decay], group: dict[str, Any], lr: float,
                     widen_to: torch.dtype | None = None) -> None:
        """Small tensors, one ``update`` call per step count (usually one): concatenated, updated, split back."""
        apply_decays(params, decays)
        batches: dict[tuple[float, torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            batches.setdefault((steps[i], p.device, p.dtype), []).append(i)
        for (step, _, _), idx in batches.items():
            update = self.make_update(group, lr, step, widen_to)
            if len(idx) == 1:
                params[idx[0]].add_(update(*tensors[idx[0]]))
                continue
            sizes = [params[i].numel() for i in idx]
            flat = [torch.cat([_flat(tensors[i][k]) for i in idx]) for k in range(len(tensors[idx[0]]))]
            delta = update(*flat)
            for k in range(1, len(flat)):  # the state, updated in place in the flat copies
                torch._foreach_copy_([_flat(tensors[i][k]) for i in idx], flat[k].split(sizes))
            torch._foreach_add_([_flat(params[i]) for i in idx], delta.split(sizes))
