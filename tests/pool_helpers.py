"""Shared by the rank-pool test modules: a module-scoped pool, and the check that a pool left
no process behind (its torchrun and workers; zombies count as gone)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from scenarios.runner import RankPool, pool_processes
from scenarios.runner.torchrun_pool import _alive


def assert_no_pool_processes(pool_id: str, pids: Iterable[int], timeout_s: float = 10.0) -> None:
    """Neither the pool's torchrun nor any of its workers may still run (zombies count as gone)."""
    pids = [p for p in pids if p]
    deadline = time.monotonic() + timeout_s
    while True:
        left = sorted(set(pool_processes(pool_id)) | {p for p in pids if _alive(p)})
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"pool {pool_id} left processes behind: {left}"


def module_pool(layout: str, device: str) -> Iterator[RankPool]:
    """For a module fixture (`yield from`): one pool that failure tests may tear down (the
    function fixture restarts it), closed at the end."""
    pool = RankPool(layout, device=device, collective_timeout_s=60.0, error_grace_s=1.0)
    try:
        yield pool
    finally:
        pool.close()
