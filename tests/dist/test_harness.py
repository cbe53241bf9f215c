"""adams_dist.testing.run: results in rank order, a rank's error with its traceback, a hang as a timeout."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch.distributed as dist

from adams_dist import testing
from adams_dist.testing import RankError, free_port, run


def report(rank: int, world: int, key: str) -> dict:
    return {"rank": rank, "world": world, "group": dist.is_initialized(), "env": os.environ.get(key),
            "threads": os.environ.get("OMP_NUM_THREADS")}


def fail_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


def hang_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_results_come_back_in_rank_order_without_a_group() -> None:
    out = run(report, 3, "ADAMS_DIST_PROBE", env={"ADAMS_DIST_PROBE": "x"}, process_group=False, timeout=60)
    assert [r["rank"] for r in out] == [0, 1, 2]
    assert all(r["world"] == 3 and not r["group"] and r["env"] == "x" and r["threads"] == "1" for r in out)
    assert "ADAMS_DIST_PROBE" not in os.environ  # the parent's environment is left as it was


def test_a_rank_error_carries_its_traceback() -> None:
    with pytest.raises(RankError, match=r"(?s)rank 1 of fail_on_rank_one.*ValueError: rank one refuses") as err:
        run(fail_on_rank_one, 2, timeout=60)
    assert err.value.rank == 1


def test_a_hang_is_a_timeout_naming_the_missing_rank() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"hang_on_rank_one at world size 2 hung: ranks \[1\]"):
        run(hang_on_rank_one, 2, timeout=20)
    assert time.monotonic() - start < 60  # the hung process was killed, not waited for


def test_a_process_group_that_cannot_form_is_started_again_on_another_port(monkeypatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # rank 0 cannot host the rendezvous here
    handed: list[int] = []
    real = testing.free_port

    def first_the_taken_port() -> int:
        handed.append(taken.getsockname()[1] if not handed else real())
        return handed[-1]

    monkeypatch.setattr(testing, "free_port", first_the_taken_port)
    try:
        out = run(report, 2, "ADAMS_DIST_PROBE", timeout=90)
    finally:
        taken.close()
    assert [r["rank"] for r in out] == [0, 1] and all(r["group"] for r in out)
    assert len(handed) == 2 and handed[0] != handed[1]


def test_ports_come_from_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(10_000 <= p < max(testing._ephemeral_start(), 12_000) for p in ports)
