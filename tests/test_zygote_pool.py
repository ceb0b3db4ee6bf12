"""A pool whose ranks are forked from one preloaded zygote (scenarios/runner/zygote.py).

What must hold as for a plain pool: each rank is its own torchrun rank (RANK, the process group,
torch elastic's error file), a dying rank is reported as it died, and nothing outlives the pool
(torchrun, stubs, zygote, forked ranks), also when the zygote or the controller is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scenarios.core.contract import ExitCode, classify
from scenarios.runner import RankDiedError, RankPool
from scenarios.runner.torchrun_pool import _alive
from tests.pool_helpers import assert_no_pool_processes
from tests.subprocess_env import child_env

pytestmark = pytest.mark.cp

REPO = Path(__file__).resolve().parents[1]
PRELOAD = "scenarios.runner.jobs_builtin:mark_preloaded"


def _pool(layout: str = "1x2") -> RankPool:
    return RankPool(layout, device="cpu", collective_timeout_s=60.0, error_grace_s=1.0,
                    preload=PRELOAD)


@pytest.fixture(scope="module")
def zpool_module() -> Iterator[RankPool]:
    pool = _pool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture()
def zpool(zpool_module: RankPool) -> RankPool:
    return zpool_module.start()  # restarts a pool an earlier test tore down


def _pids(pool: RankPool) -> list[int]:
    return [p for p in [pool.torchrun_pid, pool.zygote_pid, *(r.pid for r in pool.ranks)] if p]


def test_each_forked_rank_sees_its_own_rank(zpool: RankPool) -> None:
    seen = zpool.run("scenarios.runner.jobs_builtin:whoami", None, timeout_s=30)
    zygote = zpool.zygote_pid
    assert zygote is not None
    for rank, me in enumerate(seen):
        assert (me["rank"], me["env_rank"], me["dist_rank"], me["env_local_rank"]) == \
            (rank, rank, rank, rank)
        assert me["env_world_size"] == 2
        assert me["ppid"] == zygote  # forked from it, not started by torchrun
        assert me["preloaded_by"] == [zygote]  # and it inherited what the zygote preloaded
        assert me["error_file"]  # torch elastic's error file reached the rank
    assert len({me["pid"] for me in seen}) == 2
    assert [r.pid for r in zpool.ranks] == [me["pid"] for me in seen]


def test_allreduce_over_forked_ranks(zpool: RankPool) -> None:
    got = zpool.run("scenarios.runner.jobs_builtin:allreduce_min",
                    {"group": "world", "values": [7, 3]}, timeout_s=30)
    assert got == [3, 3]


def test_close_leaves_nothing(zpool: RankPool) -> None:
    pool_id, pids = zpool.pool_id, _pids(zpool)
    assert len(pids) == 4 and all(_alive(p) for p in pids)  # torchrun, zygote, two ranks
    zpool.close()
    assert zpool.zygote_pid is None
    assert_no_pool_processes(pool_id, pids)


def test_rank_killed_by_a_signal_reads_as_killed(zpool: RankPool) -> None:
    """The stub exits as its rank did, so torch elastic records the signal, not an exit code."""
    pool_id, pids = zpool.pool_id, _pids(zpool)
    with pytest.raises(RankDiedError, match=r"rank 1 \(pid \d+\) died \(killed by SIGKILL\)"):
        zpool.run("scenarios.runner.jobs_builtin:signal_on_rank", {"rank": 1}, timeout_s=30)
    assert_no_pool_processes(pool_id, pids)


def test_killed_zygote_ends_the_run_unknown_naming_it(zpool: RankPool) -> None:
    pool_id, pids, zygote = zpool.pool_id, _pids(zpool), zpool.zygote_pid
    assert zygote is not None
    os.kill(zygote, signal.SIGKILL)
    ranks = [r.pid for r in zpool.ranks]
    deadline = time.monotonic() + 15.0  # the ranks die with it (a job sent before may still run)
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RankDiedError) as info:
        zpool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=30)
    line = str(info.value).splitlines()[0]
    assert f"zygote (pid {zygote}" in line and "killed by SIGKILL" in line
    assert classify(info.value) == (ExitCode.UNKNOWN, line)  # cpcheck's 125, naming it
    assert_no_pool_processes(pool_id, pids)


def test_failed_preload_is_only_slower() -> None:
    """A preload that raises is said in the pool's log; the ranks are forked all the same and
    import for themselves (a release's import error then reaches the run's own job)."""
    pool = RankPool("1x2", device="cpu", preload="scenarios.no_such_module:f",
                    start_timeout_s=120.0, log_dir=None)
    try:
        pool.start()
        assert [me["ppid"] for me in pool.run("scenarios.runner.jobs_builtin:whoami", None,
                                              timeout_s=30)] == [pool.zygote_pid] * 2
        log = pool.log_tail(200)
        assert "preload scenarios.no_such_module:f failed" in log and "ModuleNotFoundError" in log
    finally:
        pool_id = pool.pool_id
        pool.close()
    assert_no_pool_processes(pool_id, [])


_CONTROLLER = f"""
import json, sys, time
from scenarios.runner import RankPool
pool = RankPool("1x2", device="cpu", collective_timeout_s=60.0, preload={PRELOAD!r})
pool.start()
print(json.dumps({{"pool_id": pool.pool_id,
                  "pids": [pool.torchrun_pid, pool.zygote_pid] + [r.pid for r in pool.ranks]}}),
      flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_killed_or_interrupted_controller_leaves_nothing(how: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _CONTROLLER], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    except BaseException:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"controller did not start: {err[-2000:]}") from None
    time.sleep(0.3)
    if how == "SIGKILL":
        proc.kill()  # no atexit, no finally: the zygote and the ranks must notice by themselves
    else:
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: the pool's atexit close runs
    _, err = proc.communicate(timeout=30)
    assert how == "SIGKILL" or "KeyboardInterrupt" in err
    assert len(info["pids"]) == 4
    assert_no_pool_processes(info["pool_id"], info["pids"], timeout_s=15.0)
