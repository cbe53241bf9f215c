"""``kernel="background"``: the compiled kernels are built in a thread while the eager path runs the steps.

On CPU a compiled kernel takes tens of seconds to build. Here no step waits for it: the first call of each
kernel signature (rule, kind, dtypes, which sizes are 0 or 1, which sizes are equal) queues a build on small
stand-in tensors of that signature and runs the eager path; a daemon thread compiles the queue. A step uses
the compiled kernels only when every rank's queue is empty (the engine sums a pending flag in its control
all-reduce), so ranks that update copies of the same parameter switch at the same step. Each compiled call
runs under ``torch.compiler.set_stance("fail_on_recompile")``: a guard the stand-ins did not foresee sends
that call back to the eager path and queues a rebuild, never a compile on the training thread.

The step at which a run switches depends on how long the build took, so two runs agree to the eager and
compiled paths' rounding, not bitwise: ``kernel="foreach"`` or ``"compiled"`` for bitwise-reproducible runs.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .compiled import map_tensors, one_graph_per_shape_kind

# While a build runs, the training thread waits this long at most for the interpreter lock after each torch
# op (Python's default, 5 ms, would add seconds to an eager step with a thousand ops).
_SWITCH_INTERVAL_S = 2e-4
_MAX_ATTEMPTS = 2  # builds per signature before its calls stay on the eager path
_threads = {"running": 0, "interval": sys.getswitchinterval()}  # build threads of every optimizer
_threads_lock = threading.Lock()


def _thread_started() -> None:
    with _threads_lock:
        if _threads["running"] == 0:
            _threads["interval"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_threads["interval"], _SWITCH_INTERVAL_S))
        _threads["running"] += 1


def _thread_ended() -> None:
    with _threads_lock:
        _threads["running"] -= 1
        if _threads["running"] == 0:
            sys.setswitchinterval(_threads["interval"])


def _signature(kind: tuple, update: Callable, args: tuple) -> tuple:
    """What a compiled call's guards depend on, with sizes and storage offsets renumbered to small
    values that keep their equalities and 0 and 1 (dynamic shapes specialise those), numbered in order of
    appearance: a square, a tall and a wide matrix take two builds, not three (the kernels compile
    without duck sizing, so no guard compares two sizes the update does not relate)."""
    tensors = [a for a in _flatten(args) if isinstance(a, torch.Tensor)]
    small = {0: 0, 1: 1}
    for n in (n for t in tensors for n in (*t.shape, int(t.storage_offset()))):
        small.setdefault(n, len(small))
    described = tuple((type(t), t.dtype, t.requires_grad, t.is_contiguous(), tuple(small[n] for n in t.shape),
                       small[int(t.storage_offset())]) for t in tensors)
    return (kind, getattr(update, "__code__", None), described)


def _flatten(args: tuple) -> list[Any]:
    return [x for a in args for x in (_flatten(a) if isinstance(a, tuple) else [a])]


def _stand_in(described: tuple) -> torch.Tensor:
    kind, dtype, requires_grad, _, shape, offset = described
    numel = 1
    for n in shape:
        numel *= n
    t = torch.zeros(offset + numel, dtype=dtype)[offset:].view(shape).detach()  # not a view, as the real ones
    return torch.nn.Parameter(t, requires_grad=requires_grad) if kind is torch.nn.Parameter else t


@dataclass
class _Build:
    """One kernel signature: ``queued`` (or being built), ``built``, or ``failed`` (its kernel did not build,
    or did not match its tensors), after ``attempts`` builds."""

    state: str = "queued"
    attempts: int = 1


class BackgroundBuilds:
    """One optimizer's queue of kernel builds and the signatures already built (see the module docstring).

    ``begin_step`` is called by the engine each step: ``allowed``, every rank's queue was empty when it began.
    """

    def __init__(self) -> None:
        self.allowed = False
        self.building = False  # a build was queued or running when this step began
        self._lock = threading.Lock()
        self._queue: list[tuple[tuple, Callable[[], Callable], tuple]] = []
        self._builds: dict[tuple, _Build] = {}
        self._thread: threading.Thread | None = None

    def __deepcopy__(self, memo: dict) -> BackgroundBuilds:  # a copied optimizer builds (or reuses) its own
        return BackgroundBuilds()

    @property
    def pending(self) -> bool:
        """Whether a build is queued or running."""
        with self._lock:
            return bool(self._queue) or self._thread is not None

    def begin_step(self, allowed: bool) -> None:
        """Called by the engine once per step: ``allowed``, no rank had a build pending."""
        self.allowed = allowed
        self.building = self.pending

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty (for tests and benchmarks). Returns whether it is."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.pending

    def run(self, kind: tuple, make_kernel: Callable[[], Callable], update: Callable, args: tuple) -> bool:
        """``make_kernel()(*args)`` when this signature is built and the step may use compiled kernels;
        otherwise queue its build (once) and return False, and the caller runs the eager path. ``kind`` names
        the kernel; ``make_kernel`` returns it (the first call imports the compiler: that too happens in the
        thread)."""
        key = _signature(kind, update, args)
        build = self._builds.get(key)
        if build is not None and build.state == "built":
            if not self.allowed:
                return False
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    make_kernel()(*args)
                return True
            except RuntimeError as err:  # raised before the kernel touched a tensor
                if "fail_on_recompile" not in str(err):
                    raise
                build.state = "failed"
                if build.attempts >= _MAX_ATTEMPTS:
                    warnings.warn(f"kernel='background': the {kind[0]} kernel built in the background did not match "
                                  f"its tensors {_MAX_ATTEMPTS} times; those tensors stay on the eager path",
                                  RuntimeWarning, stacklevel=4)
        if build is None or (build.state == "failed" and build.attempts < _MAX_ATTEMPTS):
            stand_ins = iter([_stand_in(d) for d in key[2]])
            self._enqueue(key, make_kernel, map_tensors(args, lambda _: next(stand_ins)))
        return False

    def _enqueue(self, key: tuple, make_kernel: Callable[[], Callable], args: tuple) -> None:
        self.allowed = False  # the rest of this step stays eager on every rank: no compiled call during a build
        with self._lock:
            build = self._builds.setdefault(key, _Build(attempts=0))
            build.state, build.attempts = "queued", build.attempts + 1
            self._queue.append((key, make_kernel, args))
            if self._thread is None:
                _thread_started()
                self._thread = threading.Thread(target=self._work, name="adams_dist kernel builds", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    _thread_ended()
                    return
                key, make_kernel, args = self._queue.pop(0)
            build = self._builds[key]
            try:
                with torch.no_grad(), one_graph_per_shape_kind():
                    make_kernel()(*args)
                build.state = "built"
            except Exception as err:  # the eager path goes on; say why the compiled one will not come
                warnings.warn(f"kernel='background': a compiled kernel failed to build ({type(err).__name__}: "
                              f"{err}); its tensors stay on the eager path", RuntimeWarning, stacklevel=1)
                build.state, build.attempts = "failed", _MAX_ATTEMPTS
