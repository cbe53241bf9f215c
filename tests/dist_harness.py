"""Run a function in W real processes (gloo on 127.0.0.1) with a hard time bound.

``run(fn, world_size, *args)`` returns the list of per-rank return values. ``fn(rank, world, *args)``
must live at module level so spawned processes can import it. A rank that raises fails the call
with its traceback; a run that has not finished in ``timeout`` seconds is killed and reported
as a hang, so no test can stall CI.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Any, args: tuple, results: Any, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            out = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", pickle.dumps(out)))  # plain bytes: no shared-memory handles
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, "error", traceback.format_exc()))


def run(fn: Any, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, timeout), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(outputs) + len(errors) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise TimeoutError(f"distributed run of {fn.__name__} at world size {world_size} hung: "
                                   f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    raise RuntimeError(f"ranks {dead} of {fn.__name__} died (exit codes "
                                       f"{[procs[r].exitcode for r in dead]})") from None
                continue
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
        if errors:
            raise AssertionError(f"{fn.__name__} failed at world size {world_size}:\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [outputs[r] for r in range(world_size)]
