"""An element-wise rule is one function; its compiled, eager and small-tensor paths are derived from it.

``rule_fn(lr=, step=, **hyperparams)`` does this step's scalar math in Python and returns
``update(g, *state) -> delta``, the update of one tensor: it changes the state tensors in place and
returns what to add to the parameter. ``update`` must be element-wise (each output element depends
only on the same element of its inputs) and use ``rules.atan2`` rather than ``torch.atan2``. From it:

- compiled (``kernel="compiled"``, tensors of at least ``COMPILED_MIN_NUMEL`` elements): one fused
  pass per tensor, ``p = keep*p + delta`` or, under spectral decay, ``p - coef*(W v) v^T + delta``,
  up to ``GROUP_PIECES`` tensors per compiled call; with 8-bit state (``update_8bit``) one tensor per call,
  its codes decoded and encoded in the same pass;
- eager, large tensors: ``update`` over fixed-size chunks, so its temporaries stay small and in cache
  instead of making full-size passes over memory;
- eager, small tensors: concatenated into one flat tensor per state and updated in one call, so the
  per-op cost is paid once per group instead of once per tensor.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import quant8, spectral
from ..decay import Decay
from . import compiled as compiled_kernels
from .background import BackgroundBuilds
from .base import Rule, Tensors, apply_decays, widened
from .compiled import COMPILED_MIN_NUMEL, compiled_8bit_kernel, compiled_kernel, one_graph_per_shape_kind, without_bases

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


# (piece of p, the same piece of g and the state, its (W v, v^T) under spectral decay or None, and the
# factor: the decay's coef with (W v, v^T), else its keep)
Piece = tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor] | None, float]


def pieces(p: torch.Tensor, tensors: tuple[torch.Tensor, ...], decay: Decay) -> list[Piece]:
    """One big tensor's pieces: itself, or one ``(heads, rows, cols)`` view per run of heads under spectral
    decay. Decay that no kernel folds in (column heads' rank-1 on a strided view, the scalar part before a
    rank-1 one) is applied here."""
    if decay.columns is not None:
        decay.apply_(p)
        return [(p, tensors, None, 1.0)]
    if not decay.rank1:
        return [(p, tensors, None, decay.keep)]
    if decay.keep != 1.0:
        p.mul_(decay.keep)
    out: list[Piece] = []
    for lo, hi, wv, vt in decay.runs:
        n, cols = wv.shape[0], decay.cols
        view = lambda t: t[lo * cols: hi * cols].view(n, -1, cols)  # noqa: E731
        out.append((view(p), tuple(view(t) for t in tensors), (wv, vt), decay.coef))
    return out


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
        small: list[int] = []
        large: dict[float, list[Piece]] = {}  # per step count (usually one in all)
        for i, p in enumerate(params):
            if p.numel() < COMPILED_MIN_NUMEL:
                small.append(i)
            else:
                large.setdefault(steps[i], []).extend(pieces(p, tensors[i], decays[i]))
        for work in large.values():  # flat pieces first: each compiled call then takes pieces of one kind
            work.sort(key=lambda piece: piece[2] is not None)
        kernel_ok = True
        for step, work in large.items():
            update = self.make_update(group, lr, step, widen_to)
            kernel_ok = self.update_large(work, update, compiled if kernel_ok else False, strict)
        if small:
            pick = lambda ts: [ts[i] for i in small]  # noqa: E731
            self.update_small(pick(params), pick(tensors), pick(list(steps)), pick(list(decays)), group, lr, widen_to)
        return kernel_ok or not compiled

    def update_large(self, work: list[Piece], update: Callable[..., torch.Tensor],
                     compiled: bool | BackgroundBuilds, strict: bool) -> bool:
        """Decay + update of big tensors' pieces: in compiled calls where ``compiled`` (True, or the
        ``BackgroundBuilds`` whose ready kernels to use) allows, else eagerly. Returns whether the compiled
        kernels are still in use."""
        # while kernels build in a thread, each torch call may wait for the interpreter lock: make fewer
        whole = isinstance(compiled, BackgroundBuilds) and compiled.building
        # kernel="compiled": GROUP_PIECES pieces a call. "background" builds one-piece kernels, seconds each
        # instead of tens, so that the eager steps end sooner.
        per_call = compiled_kernels.GROUP_PIECES if compiled is True else 1  # read here: a user may set it
        # kernel="compiled" traces on this thread; the setting costs ~45 us, so it is entered once, not per
        # call. The background kernels trace in their own thread.
        with one_graph_per_shape_kind() if compiled is True else contextlib.nullcontext():
            for start in range(0, len(work), per_call):
                chunk = work[start: start + per_call]
                if compiled:
                    done = self._compiled_call(chunk, update, compiled, strict)
                    if done:
                        continue
                    if done is False:  # it cannot be built: the eager path from here on
                        compiled = False
                for p, views, rank1, factor in chunk:
                    if rank1 is not None:
                        spectral.rank1_(p, rank1[0], rank1[1], factor)
                    add_in_chunks(p.view(-1), [t.view(-1) for t in views], update, 1.0 if rank1 else factor, whole)
        return compiled is not False

    def _compiled_call(self, chunk: list[Piece], update: Callable[..., torch.Tensor],
                       compiled: bool | BackgroundBuilds, strict: bool) -> bool | None:
        """One compiled kernel over ``chunk``: True when it ran, None when the background kernel is not built
        yet, False when the kernel cannot be built (after a warning; an error under ``strict``)."""
        flat = tuple((p, views, factor) for p, views, rank1, factor in chunk if rank1 is None)
        with_rank1 = tuple((p, views, *rank1, factor) for p, views, rank1, factor in chunk if rank1 is not None)
        kind = (self.name, self.rule_fn, len(flat), len(with_rank1))
        make_kernel = functools.partial(compiled_kernel, *kind)
        args = without_bases((flat, with_rank1, update))
        try:
            if isinstance(compiled, BackgroundBuilds):
                return compiled.run(kind, make_kernel, update, args) or None
            make_kernel()(*args)
            return True
        except Exception as err:  # build errors surface before the kernel touches any tensor
            return self._unavailable(err, strict)

    def update_8bit(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], step: float,
                    group: dict[str, Any], lr: float, keep: float, strict: bool) -> bool:
        """``p = keep * p + update(g, *state)`` over the whole 8-bit blocks of one big tensor whose state is
        8-bit codes (quant8.py), in one compiled call: the caller updates the partial last block. False when
        the kernel cannot be built (after a warning; an error under ``strict``), nothing changed."""
        whole = p.numel() // quant8.BLOCK * quant8.BLOCK
        blocks = lambda t: t.view(-1)[:whole].view(-1, quant8.BLOCK)  # noqa: E731
        args = (blocks(p), blocks(g), tuple(blocks(state[k]) for k in self.state_names),
                tuple(state[quant8.scale_name(k)][: whole // quant8.BLOCK] for k in self.state_names),
                tuple(quant8.tables(state[k].dtype, p.device) for k in self.state_names), keep,
                self.make_update(group, lr, step))
        try:
            compiled_8bit_kernel(self.name, self.rule_fn)(*without_bases(args))
            return True
        except Exception as err:
            return self._unavailable(err, strict)

    def _unavailable(self, err: Exception, strict: bool) -> bool:
        if strict:
            raise RuntimeError(f"kernel='compiled' was requested but torch.compile failed: {err}") from err
        warnings.warn(f"{self.name} rule: compiled kernel unavailable ({type(err).__name__}: {err}); "
                      "running the same update through the eager path", RuntimeWarning, stacklevel=6)
        return False

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
