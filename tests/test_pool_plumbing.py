"""The pool's process plumbing: torch elastic's failure record, the Listener, and cleanup.

Per-rank exit codes come from the launcher's JSON record of torch elastic's ``ChildFailedError``
(``scenarios/runner/launch.py``), never from torchrun's log text: the death tests blank the log
to prove it. The Listener runs in an accept thread that a silent stray client cannot wedge, and
close() leaves no process, thread, fd or listening socket behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scenarios.runner import (
    RankDiedError,
    RankPool,
    RankPoolStartError,
    launch,
    pool_processes,
)
from scenarios.runner import torchrun_pool as tp
from scenarios.runner.worker import ENV_ADDRESS
from tests.pool_helpers import assert_no_pool_processes, module_pool

pytestmark = pytest.mark.cp

JOBS = "scenarios.runner.jobs_builtin"
ACCEPT_THREAD = "cpcheck-pool-accept"
NOTES = sys.version_info >= (3, 11)  # exception notes (the failure record's details) are 3.11+


def _accept_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(ACCEPT_THREAD) and t.is_alive()]


@pytest.fixture(scope="module")
def pool_1x2_module() -> Iterator[RankPool]:
    yield from module_pool("1x2", device="cpu")


@pytest.fixture()
def pool_1x2(pool_1x2_module: RankPool) -> RankPool:
    return pool_1x2_module.start()


@pytest.fixture()
def no_log_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool sees an empty torchrun log: exit codes must come from the structured record."""
    monkeypatch.setattr(RankPool, "log_tail", lambda self, lines=25: "")


# -- the failure record, without processes ------------------------------------------------------


def test_failure_record_round_trip_picks_torchs_root_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ChildFailedError (one rank with a @record error file, one SIGKILLed) -> JSON -> back."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise ValueError("bad payload on rank 3")
    except ValueError as exc:
        ErrorHandler().record_exception(exc)
    data = json.loads(error_file.read_text())
    data["message"]["extraInfo"]["timestamp"] = "100"  # earlier than the SIGKILL below
    error_file.write_text(json.dumps(data))
    raised = ProcessFailure(local_rank=1, pid=4242, exitcode=1, error_file=str(error_file))
    killed = ProcessFailure(local_rank=0, pid=4141, exitcode=-9, error_file=str(tmp_path / "no"))
    err = ChildFailedError("worker", {2: killed, 3: raised})  # the SIGKILL is seen first

    out = tmp_path / "failures.json"
    launch.write_failures(out, err)
    report = launch.read_failures(out)
    assert report is not None
    assert report.root_cause == 3  # smallest timestamp, not the lowest rank nor dict order
    first = report.first
    assert (first.rank, first.local_rank, first.pid, first.exitcode) == (3, 1, 4242, 1)
    assert first.message == "ValueError: bad payload on rank 3"
    assert "Traceback" in first.traceback and "bad payload on rank 3" in first.traceback
    assert first.describe() == "exit code 1"
    other = report.failures[2]
    assert (other.exitcode, other.signal, other.traceback) == (-9, "SIGKILL", "")
    assert other.describe() == "killed by SIGKILL"
    assert launch.read_failures(tmp_path / "absent.json") is None
    out.write_text("{not json")
    assert launch.read_failures(out) is None


# -- per-rank deaths, named from the record ------------------------------------------------------


@pytest.mark.usefixtures("no_log_text")
def test_sigkilled_rank_is_named_with_its_signal(pool_1x2: RankPool) -> None:
    pool_id = pool_1x2.pool_id
    pids = [pool_1x2.torchrun_pid or 0] + [r.pid for r in pool_1x2.ranks]
    with pytest.raises(RankDiedError) as info:
        pool_1x2.run(f"{JOBS}:signal_on_rank", {"rank": 1, "signal": 9}, timeout_s=30)
    err = info.value
    assert (err.rank, err.exitcode) == (1, -signal.SIGKILL)
    assert str(err).startswith(
        f"rank 1 (pid {pids[2]}) died (killed by SIGKILL) during job '{JOBS}:signal_on_rank'"
    )
    if NOTES:
        notes = "\n".join(err.__notes__)
        assert "failed ranks (torch elastic, root cause first):\n  rank 1 (pid" in notes
        assert "torchrun log" not in notes  # the log was blanked: nothing was read from it
    assert not pool_1x2.running
    assert_no_pool_processes(pool_id, pids)


@pytest.mark.usefixtures("no_log_text")
def test_os_exit_in_a_job_gives_that_exit_code(pool_1x2: RankPool) -> None:
    pid0 = pool_1x2.ranks[0].pid
    with pytest.raises(RankDiedError) as info:
        pool_1x2.run(f"{JOBS}:exit_on_rank", {"rank": 0, "code": 3}, timeout_s=30)
    assert (info.value.rank, info.value.exitcode) == (0, 3)
    assert str(info.value).startswith(f"rank 0 (pid {pid0}) died (exit code 3) during job ")


def test_worker_exception_traceback_reaches_the_start_error() -> None:
    """A worker whose setup raises (gloo cannot find the interface) writes torch's error file."""
    pool = RankPool("1x2", device="cpu", env={"GLOO_SOCKET_IFNAME": "nosuchif0"})
    with pytest.raises(RankPoolStartError) as info:
        pool.start()
    msg = str(info.value)
    assert "torchrun exited with code 1 after 0 of 2 ranks connected; rank " in msg
    assert "failed first (exit code 1): RuntimeError: " in msg and "nosuchif0" in msg
    if NOTES:
        notes = "\n".join(info.value.__notes__)
        assert "traceback ---\nTraceback (most recent call last):" in notes
        assert "init_process_group" in notes  # the worker's own frame, from its @record file
    assert pool.torchrun_pid is None
    assert_no_pool_processes(pool.pool_id, [])


# -- start: torchrun exits, strays ---------------------------------------------------------------


def _start_in_thread(pool: RankPool) -> tuple[threading.Thread, list[BaseException], list[float]]:
    errors: list[BaseException] = []
    done: list[float] = []

    def go() -> None:
        try:
            pool.start()
        except BaseException as exc:
            errors.append(exc)
        done.append(time.monotonic())

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, errors, done


def _wait_torchrun(pool: RankPool, timeout_s: float = 30.0) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = pool.torchrun_pid
        if pid:
            return psutil.Process(pid)
        time.sleep(0.005)
    raise AssertionError("torchrun did not appear")


def test_torchrun_exit_during_start_is_noticed_quickly() -> None:
    pool = RankPool("1x2", device="cpu", start_timeout_s=120.0)
    t, errors, done = _start_in_thread(pool)
    torchrun = _wait_torchrun(pool)
    killed_at = time.monotonic()
    torchrun.kill()
    t.join(60.0)
    assert not t.is_alive(), "start() did not return after torchrun died"
    assert len(errors) == 1 and isinstance(errors[0], RankPoolStartError), errors
    assert "torchrun exited with code -9 after 0 of 2 ranks connected" in str(errors[0])
    assert done[0] - killed_at < 3.0, done[0] - killed_at  # 0.5 s poll + teardown
    assert not _accept_threads()
    assert_no_pool_processes(pool.pool_id, [])


def _stray_client(pool: RankPool) -> tuple[socket.socket, bool]:
    """Connect to the pool's listener (address from torchrun's environment) and stay silent.

    Returns the socket and whether torchrun had started any worker yet (then the stray was
    surely first in the queue).
    """
    torchrun = _wait_torchrun(pool)
    deadline = time.monotonic() + 30.0
    while True:
        try:
            address = torchrun.environ().get(ENV_ADDRESS)
        except psutil.Error:
            address = None
        if address or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    assert address, "no listener address in torchrun's environment"
    host, port = address.rsplit(":", 1)
    stray = socket.create_connection((host, int(port)), timeout=5.0)
    return stray, not torchrun.children()


def test_silent_stray_client_does_not_stop_the_pool_starting() -> None:
    pool = RankPool("1x2", device="cpu", start_timeout_s=120.0)
    t, errors, _ = _start_in_thread(pool)
    stray, before_workers = _stray_client(pool)
    try:
        assert before_workers, "the stray connected after the workers; the test proves nothing"
        t.join(150.0)
        assert not t.is_alive() and not errors, errors
        assert pool.running and [r.rank for r in pool.ranks] == [0, 1]
        assert pool.run(f"{JOBS}:ping", None, timeout_s=30)[1]["rank"] == 1
        stray.settimeout(5.0)
        seen = b""
        while chunk := stray.recv(4096):  # the challenge, then EOF: the pool hung up on it
            seen += chunk
        assert b"#CHALLENGE#" in seen
    finally:
        stray.close()
        pool.close()
    assert not _accept_threads()


def test_stray_check_can_fire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug: without reaping, the stray wedges start (proves the test above can fail);
    close() still wakes the accept thread stuck in the stray's handshake."""
    monkeypatch.setattr(tp._Acceptor, "reap_stuck", lambda self: None)
    pool = RankPool("1x2", device="cpu", start_timeout_s=20.0)
    t, errors, _ = _start_in_thread(pool)
    stray, before_workers = _stray_client(pool)
    try:
        t.join(120.0)
        assert not t.is_alive()
        assert before_workers
        assert len(errors) == 1 and isinstance(errors[0], RankPoolStartError), errors
        assert "did not start in 20 s: 0 of 2 ranks connected (missing [0, 1])" in str(errors[0])
        assert not _accept_threads()  # woken out of the handshake although the stray stayed
    finally:
        stray.close()
    assert_no_pool_processes(pool.pool_id, [])


# -- close ---------------------------------------------------------------------------------------


def _listening(proc: psutil.Process) -> set[int]:
    return {c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_close_leaves_no_process_thread_fd_or_port() -> None:
    me = psutil.Process()
    fds_before = me.num_fds()
    listening_before = _listening(me)
    children_before = {c.pid for c in me.children(recursive=True)}  # e.g. a session's master
    pool = RankPool("1x2", device="cpu")
    pool.start()
    pool_id = pool.pool_id
    pids = [pool.torchrun_pid or 0] + [r.pid for r in pool.ranks]
    assert len(pool_processes(pool_id)) == 3  # torchrun (the launcher) and two workers
    pool.close()
    assert pool_processes(pool_id) == []
    assert not any(tp._alive(p) for p in pids)
    assert not [c for c in me.children(recursive=True) if tp._live(c) and c.pid not in children_before]
    assert not _accept_threads()
    assert _listening(me) <= listening_before
    assert me.num_fds() <= fds_before, (fds_before, me.num_fds())
    assert pool.log_path is None and not os.environ.get(launch.ENV_FAILURES)
