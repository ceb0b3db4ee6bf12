"""A rank pool over two hosts (two torchrun agents on 127.0.0.1, one rendezvous).

The first "host" is the pool's own torchrun (it hosts the c10d store); the second is
`cpcheck agent`, a separate process tree that reads the pool's config from that store.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scenarios.cli.main import main
from scenarios.runner.torchrun_pool import RankDiedError, RankPool, RankPoolStartError
from tests.pool_helpers import assert_no_pool_processes
from tests.subprocess_env import child_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(endpoint: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scenarios.cli", "agent", "--nnodes", "2",
                             "--rdzv-endpoint", endpoint, "--wait", "60", *extra],
                            env=child_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        _kill_tree(proc.pid)
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture
def endpoint() -> str:
    return f"127.0.0.1:{_free_port()}"


@pytest.fixture
def agent(endpoint: str) -> Iterator[subprocess.Popen]:
    proc = _agent(endpoint)
    yield proc
    _stop(proc)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torch elastic starts its workers in sessions
    of their own, so the agent's process group does not reach them)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)


def _descends_from(pid: int, ancestor: int) -> bool:
    p: psutil.Process | None = psutil.Process(pid)
    while p is not None:
        if p.pid == ancestor:
            return True
        p = p.parent()
    return False


def test_1x2_over_two_agents_runs_jobs_across_hosts(endpoint: str,
                                                    agent: subprocess.Popen) -> None:
    with RankPool("1x2", nnodes=2, rdzv_endpoint=endpoint, start_timeout_s=90) as pool:
        pings = pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=30)
        assert [p["rank"] for p in pings] == [0, 1]
        # rank 1 lives in the agent's process tree, rank 0 in the pool's own torchrun
        assert _descends_from(pings[1]["pid"], agent.pid)
        assert not _descends_from(pings[0]["pid"], agent.pid)
        assert _descends_from(pings[0]["pid"], pool.torchrun_pid)
        # a collective across the two hosts
        got = pool.run("scenarios.runner.jobs_builtin:allreduce_min",
                       {"values": [7, 3]}, timeout_s=30)
        assert got == [3, 3]
        pool_id = pool.pool_id
    assert_no_pool_processes(pool_id, [p["pid"] for p in pings])


def test_an_agent_that_leaves_is_named_and_a_restarted_pool_runs(endpoint: str,
                                                                 agent: subprocess.Popen) -> None:
    pool = RankPool("1x2", nnodes=2, rdzv_endpoint=endpoint, start_timeout_s=90,
                    collective_timeout_s=20)
    try:
        pool.start()
        pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=30)
        _kill_tree(agent.pid)  # the whole second host goes away (agent, torchrun, workers)
        with pytest.raises(RankDiedError, match=r"agent 2 of 2 \(rank 1\) left"):
            pool.run("scenarios.runner.jobs_builtin:allreduce_min", {"values": [1, 2]},
                     timeout_s=30)
        assert not pool.running
        second = _agent(endpoint)  # a host comes back: the pool starts again over it
        try:
            pool.start()
            assert pool.run("scenarios.runner.jobs_builtin:allreduce_min", {"values": [5, 4]},
                            timeout_s=30) == [4, 4]
        finally:
            pool.close()
            _stop(second)
    finally:
        pool.close()


def test_a_stopped_agent_times_the_job_out_naming_its_host(endpoint: str,
                                                            agent: subprocess.Popen) -> None:
    from scenarios.runner.torchrun_pool import RankTimeoutError

    pool = RankPool("1x2", nnodes=2, rdzv_endpoint=endpoint, start_timeout_s=90,
                    collective_timeout_s=60)
    tree = []
    try:
        pool.start()
        root = psutil.Process(agent.pid)
        tree = [root, *root.children(recursive=True)]
        for p in tree:  # the whole second host hangs (SIGSTOP)
            p.suspend()
        with pytest.raises(RankTimeoutError, match=r"rank 1 on agent 2 of 2 \(rank 1\)"):
            pool.run("scenarios.runner.jobs_builtin:allreduce_min", {"values": [1, 2]},
                     timeout_s=6)
    finally:
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.resume()
        pool.close()


def test_a_host_that_never_joins_fails_the_start_naming_the_rendezvous(endpoint: str) -> None:
    # 15 s: torchrun's own store start-up took over 8 s on a 2-core box at load ~30, and a
    # start cut before the store is up cannot yet tell that the other host never came
    pool = RankPool("1x2", nnodes=2, rdzv_endpoint=endpoint, start_timeout_s=15)
    t0 = time.monotonic()
    with pytest.raises(RankPoolStartError, match="never joined") as e:
        pool.start()
    assert endpoint in str(e.value) and time.monotonic() - t0 < 60
    assert not pool.running


def test_pool_refuses_a_layout_hosts_cannot_share() -> None:
    from scenarios.runner.torchrun_pool import RankPoolConfigError

    with pytest.raises(RankPoolConfigError, match="cannot share evenly"):
        RankPool("1x3", nnodes=2, rdzv_endpoint="127.0.0.1:29400")
    with pytest.raises(RankPoolConfigError, match="HOST:PORT"):
        RankPool("1x2", nnodes=2, rdzv_endpoint="nowhere")


@pytest.mark.parametrize(("argv", "needle"), [
    (["agent", "--nnodes", "2", "--rdzv-endpoint", "nope"], "HOST:PORT"),
    (["agent", "--nnodes", "1", "--rdzv-endpoint", "127.0.0.1:1234"], "at least 2 hosts"),
])
def test_agent_bad_input_is_one_line_exit_2(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_agent_with_no_first_host_is_unknown(capsys) -> None:
    assert main(["agent", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                 "--wait", "2"]) == 125
    assert "no pool to join" in capsys.readouterr().err


def _soak_over_two_agents(tmp_path: Path, endpoint: str, variant: str,
                          minutes: str) -> tuple[int, dict]:
    out = tmp_path / variant
    rc = main(["soak", "--mode", "torchrun", "--layout", "2x2", "--nnodes", "2",
               "--rdzv-endpoint", endpoint, "--minutes", minutes, "--seed", "4",
               "--variant", variant, "--out", str(out)])
    return rc, json.loads((out / "latest" / "report.json").read_text())


@pytest.mark.cp
@pytest.mark.soak  # minutes on 2 cores: `-m cp` and the nightly run it
def test_2x2_soak_over_two_agents_agrees_when_fixed(tmp_path: Path, endpoint: str,
                                                    agent: subprocess.Popen) -> None:
    rc, rep = _soak_over_two_agents(tmp_path, endpoint, "fixed", "0.6")
    assert rc == 0 and rep["runs"] > 0, rep["verdict"]


@pytest.mark.cp
@pytest.mark.soak  # minutes on 2 cores: `-m cp` and the nightly run it
def test_2x2_soak_over_two_agents_catches_tp_only_sync_replayable_on_one(
        tmp_path: Path, endpoint: str, agent: subprocess.Popen) -> None:
    rc, rep = _soak_over_two_agents(tmp_path, endpoint, "tp_only_sync", "2")
    assert rc == 1 and rep["confirmed_by_replay"], rep["verdict"]
    _stop(agent)  # the replay runs on one host, one torchrun agent
    assert main(["replay", rep["replay"], "--mode", "torchrun"]) == 1


def test_multihost_flags_bad_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    base = ["soak", "--minutes", "0.02", "--out", str(tmp_path / "o")]
    for extra, needle in [
        (["--nnodes", "2", "--mode", "torchrun"], "needs --rdzv-endpoint"),
        (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"], "need --mode torchrun"),
        (["--rdzv-endpoint", "127.0.0.1:1"], "needs --nnodes"),
        (["--nnodes", "2", "--mode", "torchrun", "--rdzv-endpoint", "x"], "HOST:PORT"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (extra, err)


@pytest.mark.cp
@pytest.mark.soak  # minutes on 2 cores: `-m cp` and the nightly run it
def test_4x4_over_two_agents_agrees_and_catches_tp_only_sync(tmp_path: Path, endpoint: str,
                                                             agent: subprocess.Popen) -> None:
    """16 ranks, 8 per host: every CP group spans both hosts (TP groups of 4 stay on one)."""
    base = ["run", "write_acks", "--layout", "4x4", "--mode", "torchrun", "--nnodes", "2",
            "--rdzv-endpoint", endpoint, "--timeout", "60", "--replay-dir", str(tmp_path)]
    assert main(base) == 0
    assert main([*base, "--variant", "tp_only_sync"]) == 1
    assert list(tmp_path.glob("replay-tp_only_sync-4x4-*.json"))
