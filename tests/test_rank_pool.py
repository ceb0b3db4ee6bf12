"""The torchrun rank pool: start, reuse, per-group all-reduce, and every failure path.

Every failure test also checks that no torchrun or worker process of that pool is left. The
module-scoped ``pool_2x2`` + function-scoped ``pool`` fixtures are the pattern to copy: one
start per module (seconds), a restart only after a test that tore the pool down.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from scenarios.core.layout import GROUP_KINDS, Layout, LayoutError
from scenarios.runner import (
    Diagnosis,
    PoolNotRunningError,
    RankDiedError,
    RankJobError,
    RankPool,
    RankPoolConfigError,
    RankPoolStartError,
    RankTimeoutError,
    max_ranks_here,
)
from scenarios.runner.torchrun_pool import _alive
from tests.pool_helpers import assert_no_pool_processes, module_pool
from tests.subprocess_env import child_env

pytestmark = pytest.mark.cp

JOBS = "scenarios.runner.jobs_builtin"
REPO = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------


def pool_pids(pool: RankPool) -> list[int]:
    return [pool.torchrun_pid or 0] + [r.pid for r in pool.ranks]


def pool_identity(pool: RankPool) -> tuple[str, list[int]]:
    assert pool.running
    return pool.pool_id, pool_pids(pool)


# -- fixtures (copy this pattern) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pool_2x2() -> Iterator[RankPool]:
    """One 2x2 pool for the whole module, closed (and checked clean) at the end."""
    pool = RankPool("2x2", device="auto", collective_timeout_s=60.0, start_timeout_s=120.0)
    with pool:
        yield pool
        pool_id, pids = pool.pool_id, pool_pids(pool)
    assert_no_pool_processes(pool_id, pids)


@pytest.fixture()
def pool(pool_2x2: RankPool) -> RankPool:
    """The module pool, restarted if an earlier test's failure tore it down."""
    return pool_2x2.start()


@pytest.fixture(scope="module")
def pool_1x2_module() -> Iterator[RankPool]:
    yield from module_pool("1x2", device="auto")


@pytest.fixture()
def pool_1x2(pool_1x2_module: RankPool) -> RankPool:
    return pool_1x2_module.start()


# -- happy paths on one reused pool --------------------------------------------------------------


def test_ping_every_rank(pool: RankPool) -> None:
    out = pool.run(f"{JOBS}:ping", None, timeout_s=30)
    assert [r["rank"] for r in out] == [0, 1, 2, 3]
    assert [r["pid"] for r in out] == [info.pid for info in pool.ranks]
    assert len({r["pid"] for r in out}) == 4
    assert {r["world_size"] for r in out} == {4}
    assert len({r["job_id"] for r in out}) == 1
    devices = [r["device"] for r in out]
    assert devices == [info.device for info in pool.ranks]
    assert set(devices) == {"cpu"} or all(d.startswith("cuda:") for d in devices)


def test_many_jobs_reuse_one_pool_and_are_fast(pool: RankPool) -> None:
    pids = [info.pid for info in pool.ranks]
    job_ids = []
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        out = pool.run(f"{JOBS}:ping", None, timeout_s=30)
        times.append(time.perf_counter() - t0)
        job_ids.append(out[0]["job_id"])
        assert [r["pid"] for r in out] == pids  # the same workers every time
    assert job_ids == sorted(set(job_ids)) and len(job_ids) == 200
    median_ms = statistics.median(times) * 1e3
    print(f"\nround trip, trivial job, 4 ranks: median {median_ms:.2f} ms")
    assert median_ms < 50.0  # target is < 5 ms; loose bound so a loaded CI box does not flake


@pytest.mark.parametrize("kind", [*GROUP_KINDS, "world"])
def test_allreduce_min_per_group(pool: RankPool, kind: str) -> None:
    values = [5, 3, 8, 6]
    out = pool.run(f"{JOBS}:allreduce_min", {"group": kind, "values": values}, timeout_s=30)
    layout = pool.layout
    for rank, got in enumerate(out):
        ranks = range(4) if kind == "world" else layout.group(kind, rank)  # type: ignore[arg-type]
        assert got == min(values[r] for r in ranks), (kind, rank)


def test_attn_cp_and_attn_tp_differ_and_two_steps_give_global_min(pool: RankPool) -> None:
    values = [5, 3, 8, 6]
    cp = pool.run(f"{JOBS}:allreduce_min", {"group": "attn_cp", "values": values}, timeout_s=30)
    tp = pool.run(f"{JOBS}:allreduce_min", {"group": "attn_tp", "values": values}, timeout_s=30)
    assert cp == [5, 3, 5, 3]
    assert tp == [3, 3, 6, 6]
    steps = {"groups": ["attn_cp", "attn_tp"], "values": values}
    assert pool.run(f"{JOBS}:allreduce_min_steps", steps, timeout_s=30) == [3, 3, 3, 3]
    only_tp = {"groups": ["attn_tp"], "values": [9, 9, 1, 1]}  # TP-only sync misses CP peers
    assert pool.run(f"{JOBS}:allreduce_min_steps", only_tp, timeout_s=30) == [9, 9, 1, 1]


def test_worker_groups_match_layout(pool: RankPool) -> None:
    out = pool.run(f"{JOBS}:group_ranks", None, timeout_s=30)
    for rank, groups in enumerate(out):
        for kind in GROUP_KINDS:
            assert tuple(groups[kind]) == pool.layout.group(kind, rank)


def test_rank_error_names_rank_and_pool_survives(pool: RankPool) -> None:
    pids = [info.pid for info in pool.ranks]
    with pytest.raises(RankJobError) as info:
        pool.run(f"{JOBS}:raise_on_rank", {"rank": 2, "message": "kaboom"}, timeout_s=30)
    err = info.value
    assert str(err) == f"job '{JOBS}:raise_on_rank' failed on rank 2: RuntimeError: kaboom"
    assert err.ranks == [2]
    assert "raise_on_rank" in err.failures[2][1] and "Traceback" in err.failures[2][1]
    assert pool.running
    assert [r["pid"] for r in pool.run(f"{JOBS}:ping", None, timeout_s=30)] == pids


def test_errors_on_several_ranks_are_all_named(pool: RankPool) -> None:
    with pytest.raises(RankJobError) as info:
        pool.run(f"{JOBS}:raise_on_rank", {"rank": [1, 3], "message": "bad"}, timeout_s=30)
    msg = str(info.value)
    assert "failed on ranks [1, 3]" in msg
    assert "rank 1: RuntimeError: bad" in msg and "rank 3: RuntimeError: bad" in msg
    assert "rank 0" not in msg and "rank 2" not in msg


def test_unknown_job_is_a_job_error(pool: RankPool) -> None:
    with pytest.raises(RankJobError, match="failed on ranks \\[0, 1, 2, 3\\]") as info:
        pool.run(f"{JOBS}:no_such_job", None, timeout_s=30)
    assert "AttributeError" in str(info.value)
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        pool.run("not_a_job_name", None, timeout_s=30)
    assert pool.run(f"{JOBS}:ping", None, timeout_s=30)[3]["rank"] == 3


class _ControllerOnly:
    """Picklable here (its module is registered below), not importable by any worker."""


_CONTROLLER_ONLY = types.ModuleType("cpcheck_controller_only_module")
_ControllerOnly.__module__ = _CONTROLLER_ONLY.__name__
_CONTROLLER_ONLY._ControllerOnly = _ControllerOnly  # type: ignore[attr-defined]


def test_payload_workers_cannot_unpickle_is_a_job_error(pool: RankPool) -> None:
    sys.modules[_CONTROLLER_ONLY.__name__] = _CONTROLLER_ONLY
    try:
        with pytest.raises(RankJobError, match="ModuleNotFoundError") as info:
            pool.run(f"{JOBS}:ping", _ControllerOnly(), timeout_s=30)
    finally:
        del sys.modules[_CONTROLLER_ONLY.__name__]
    assert info.value.ranks == [0, 1, 2, 3]
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):  # never leaves here
        pool.run(f"{JOBS}:ping", lambda: None, timeout_s=30)
    assert pool.run(f"{JOBS}:ping", None, timeout_s=30)[0]["rank"] == 0


def test_diagnose_idle_pool(pool: RankPool) -> None:
    diag = pool.diagnose()
    assert sorted(diag) == [0, 1, 2, 3]
    for rank, d in diag.items():
        assert isinstance(d, Diagnosis), d
        assert d.rank == rank and not d.busy and d.status == "idle"
        assert "job_loop" in d.stacks  # the main thread is waiting for the next job


# -- other layouts -------------------------------------------------------------------------------


def test_1x4_pool_starts_and_reduces_over_cp() -> None:
    with RankPool("1x4", device="auto", collective_timeout_s=60.0) as pool:
        pool_id, pids = pool_identity(pool)
        assert [r["rank"] for r in pool.run(f"{JOBS}:ping", None, timeout_s=30)] == [0, 1, 2, 3]
        values = [4, 2, 7, 9]
        cp = pool.run(f"{JOBS}:allreduce_min", {"group": "attn_cp", "values": values}, timeout_s=30)
        tp = pool.run(f"{JOBS}:allreduce_min", {"group": "attn_tp", "values": values}, timeout_s=30)
        assert cp == [2, 2, 2, 2]
        assert tp == values  # single-rank attention-TP groups are real groups of one
    assert not pool.running
    assert_no_pool_processes(pool_id, pids)
    pool.close()  # idempotent
    with pytest.raises(PoolNotRunningError, match="closed"):
        pool.run(f"{JOBS}:ping", None, timeout_s=30)


# -- failures: each tears the pool down and must leave nothing behind ----------------------------


def test_hang_is_reported_with_what_the_rank_waits_on(pool_1x2: RankPool) -> None:
    pool_id, pids = pool_identity(pool_1x2)
    payload = {"rank": 1, "group": "attn_cp", "tag": "prefetch_hits"}
    t0 = time.monotonic()
    with pytest.raises(RankTimeoutError) as info:
        pool_1x2.run(f"{JOBS}:sleep_forever_on_rank", payload, timeout_s=2.0)
    elapsed = time.monotonic() - t0
    err = info.value
    first = str(err).splitlines()[0]
    assert first.startswith(f"rank 1 did not finish job '{JOBS}:sleep_forever_on_rank' in 2 s: ")
    assert "waiting on all_reduce MIN over [0, 1] (prefetch_hits)" in first
    assert err.ranks == [1]
    d = err.diagnoses[1]
    assert isinstance(d, Diagnosis) and d.busy and "all_reduce" in d.stacks
    assert elapsed < 2.0 + 12.0, elapsed  # job timeout + diagnosis + kill, never the gloo timeout
    assert not pool_1x2.running
    assert_no_pool_processes(pool_id, pids)
    with pytest.raises(PoolNotRunningError, match="timeout in job"):
        pool_1x2.run(f"{JOBS}:ping", None, timeout_s=30)


def test_dead_rank_is_reported(pool_1x2: RankPool) -> None:
    pool_id, pids = pool_identity(pool_1x2)
    with pytest.raises(RankDiedError) as info:
        pool_1x2.run(f"{JOBS}:exit_on_rank", {"rank": 1, "code": 7}, timeout_s=30)
    err = info.value
    assert (err.rank, err.exitcode) == (1, 7)
    assert str(err).startswith(f"rank 1 (pid {pids[2]}) died (exit code 7) during job ")
    assert not pool_1x2.running
    assert_no_pool_processes(pool_id, pids)


def test_error_while_peers_wait_in_collective(pool_1x2: RankPool) -> None:
    pool_id, pids = pool_identity(pool_1x2)
    t0 = time.monotonic()
    with pytest.raises(RankJobError) as info:
        pool_1x2.run(f"{JOBS}:raise_before_collective_on_rank", {"rank": 0}, timeout_s=30)
    msg = str(info.value)
    assert msg.startswith(f"job '{JOBS}:raise_before_collective_on_rank' failed on rank 0: ")
    assert "ranks [1] did not finish within 1 s of the error" in msg
    assert "waiting on all_reduce MIN over [0, 1] (peer of a failed rank)" in msg
    assert time.monotonic() - t0 < 15.0
    assert not pool_1x2.running
    assert_no_pool_processes(pool_id, pids)


def test_killed_torchrun_is_reported(pool_1x2: RankPool) -> None:
    pool_id, pids = pool_identity(pool_1x2)
    os.kill(pids[0], signal.SIGKILL)
    # orphaned workers notice their parent is gone (checked every 0.5 s) and exit by themselves
    deadline = time.monotonic() + 10.0
    while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(p) for p in pids[1:]), "orphaned workers did not exit"
    with pytest.raises(RankDiedError, match="torchrun .* exited \\(killed by SIGKILL\\)") as info:
        pool_1x2.run(f"{JOBS}:ping", None, timeout_s=30)
    assert info.value.rank is None
    assert_no_pool_processes(pool_id, pids)  # orphaned workers noticed and left


def test_start_timeout_cleans_up() -> None:
    pool = RankPool("1x2", device="auto", start_timeout_s=0.5)
    with pytest.raises(RankPoolStartError, match=r"did not start in 0\.5 s: 0 of 2 ranks"):
        pool.start()
    assert not pool.running and pool.torchrun_pid is None
    assert_no_pool_processes(pool.pool_id, [])


# -- the controller itself is interrupted or killed ----------------------------------------------

_CONTROLLER = """
import json, sys, time
from scenarios.runner import RankPool
pool = RankPool("1x2", device="auto", collective_timeout_s=60.0)
pool.start()
print(json.dumps({"pool_id": pool.pool_id, "pids": [pool.torchrun_pid] + [r.pid for r in pool.ranks]}), flush=True)
if sys.argv[1] == "hang":
    pool.run("scenarios.runner.jobs_builtin:sleep_forever_on_rank", {"rank": 1}, timeout_s=120)
else:
    time.sleep(120)
"""


def _spawn_controller(mode: str) -> tuple[subprocess.Popen[str], str, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CONTROLLER, mode],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the controller's own start_timeout_s is 120 s
        info = json.loads(line)
    except BaseException:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"controller did not start: {err[-2000:]}") from None
    time.sleep(0.5)  # let it get into the job
    return proc, info["pool_id"], info["pids"]


def test_ctrl_c_in_controller_leaves_nothing() -> None:
    proc, pool_id, pids = _spawn_controller("hang")
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert_no_pool_processes(pool_id, pids)


def test_killed_controller_leaves_nothing() -> None:
    proc, pool_id, pids = _spawn_controller("idle")
    proc.kill()  # no atexit, no finally: workers must notice the closed connection themselves
    proc.communicate(timeout=30)
    assert_no_pool_processes(pool_id, pids, timeout_s=15.0)


# -- bad input: one clear line, no processes -----------------------------------------------------


def test_too_many_ranks_for_this_machine() -> None:
    with pytest.raises(RankPoolConfigError) as info:
        RankPool("2x2", max_ranks=2)
    assert str(info.value) == (
        "layout '2x2' needs 4 ranks, more than this machine can run "
        "(cap 2 = max_ranks; pass max_ranks= to override)"
    )
    cap = max_ranks_here()
    with pytest.raises(RankPoolConfigError, match=f"cap {cap} = 4 x {cap // 4} CPU cores"):
        RankPool(Layout(cap + 1, 1))


def test_explicit_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        pool = RankPool("1x2", port=port)
        with pytest.raises(RankPoolConfigError) as info:
            pool.start()
    assert str(info.value) == (
        f"port {port} on 127.0.0.1 is already in use; pass port=None to pick a free one"
    )
    assert pool.torchrun_pid is None


def test_cuda_requested_without_gpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(RankPoolConfigError, match="device 'cuda' requested but no GPU is visible"):
        RankPool("1x2", device="cuda")


def test_bad_layout_and_device() -> None:
    with pytest.raises(LayoutError, match="unknown layout '2y2'"):
        RankPool("2y2")
    with pytest.raises(RankPoolConfigError, match="device 'tpu'"):
        RankPool("1x2", device="tpu")  # type: ignore[arg-type]
