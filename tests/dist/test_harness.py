"""adams_dist.testing.run: results in rank order, a rank's error with its traceback, a hang as a timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from adams_dist.testing import RankError, run


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
