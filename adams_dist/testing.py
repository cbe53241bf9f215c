"""Run a function in W fresh processes on this machine, with a hard time bound.

``run(fn, world_size, *args)`` starts ``world_size`` spawned processes, each with one CPU thread, joins
them into a gloo process group on 127.0.0.1 (``process_group=False`` leaves that out), calls
``fn(rank, world_size, *args)`` in each and returns the per-rank return values in rank order.
``fn`` must be importable (defined at module level), and its arguments and return value picklable.

- A rank that raises fails the call with :class:`RankError`, whose message carries that rank's
  traceback; a process that dies without reporting (a crash, a kill) fails it the same way.
- A run that has not finished after ``timeout`` seconds is killed and raises :class:`TimeoutError`
  naming the ranks that did not finish, so a hang cannot stall a test suite or a benchmark.
- ``env`` adds environment variables to the processes (``OMP_NUM_THREADS`` is 1 unless it sets it).
- The rendezvous port lies below the kernel's ephemeral range, where no outgoing connection of another
  test is given it; a process group that still fails to form is started again on another port (3 tries).

Used by this project's multi-process tests and benchmarks; it works on any machine torch runs on.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import random
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RankError", "free_port", "run"]


class RankError(RuntimeError):
    """A rank of :func:`run` raised or died; ``rank`` names it and the message holds its traceback."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


_INIT_TRIES = 3


class _InitFailed(RuntimeError):
    """A rank could not join the process group: the run is started again on another port."""


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and Windows start at 49152


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the ephemeral range: the kernel
    hands ports from that range to outgoing connections (gloo's own among them), so one taken from it
    could be given away between this call and the bind."""
    pick = random.SystemRandom()  # not the seeded module generator: concurrent runs must not pick alike
    top = max(_ephemeral_start(), 12_000)
    for _ in range(100):
        port = pick.randrange(10_000, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # everything below is taken: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, process_group: bool, fn: Callable[..., Any], args: tuple,
            results: Any, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if process_group:
            try:
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                        timeout=datetime.timedelta(seconds=timeout))
            except Exception:
                results.put((rank, "init", traceback.format_exc()))
                return
        try:
            out = fn(rank, world, *args)
        finally:
            if process_group:
                dist.destroy_process_group()
        results.put((rank, "ok", pickle.dumps(out)))  # plain bytes: no shared-memory handles to outlive us
    except BaseException:  # everything, assertion errors included, goes back to the parent
        results.put((rank, "error", traceback.format_exc()))


def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
        env: Mapping[str, str] | None = None, process_group: bool = True) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each in its own process.

    Raises :class:`RankError` when a rank raises or dies, :class:`TimeoutError` when the run is not done
    within ``timeout`` seconds (every process is killed either way)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    name = getattr(fn, "__qualname__", repr(fn))
    deadline = time.monotonic() + timeout
    for attempt in range(1, _INIT_TRIES + 1):
        try:
            return _run_once(name, fn, world_size, args, deadline, timeout, env, process_group)
        except _InitFailed as err:
            if attempt == _INIT_TRIES:
                raise RankError(f"{name} at world size {world_size}: the process group did not form in "
                                f"{_INIT_TRIES} tries, the last one failing on {err}", err.args[1]) from None
    raise AssertionError("unreachable")


def _run_once(name: str, fn: Callable[..., Any], world_size: int, args: tuple, deadline: float, timeout: float,
              env: Mapping[str, str] | None, process_group: bool) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    saved = dict(os.environ)
    os.environ.update({"OMP_NUM_THREADS": "1", **(env or {})})  # children copy the environment at start
    try:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, process_group, fn, args, results, timeout),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise TimeoutError(f"{name} at world size {world_size} hung: ranks {missing} did not finish "
                                   f"within {timeout:g} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                if dead:
                    raise RankError(f"rank {dead[0]} of {name} (world size {world_size}) died with exit code "
                                    f"{procs[dead[0]].exitcode}; ranks that died: {dead}", dead[0]) from None
                continue
            if status == "init":
                raise _InitFailed(f"port {port}, rank {rank}:\n{payload}", rank)
            if status != "ok":
                raise RankError(f"rank {rank} of {name} (world size {world_size}) failed:\n{payload}", rank)
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [outputs[r] for r in range(world_size)]
