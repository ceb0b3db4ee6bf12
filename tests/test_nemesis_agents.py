"""Faults on a whole agent (`stop_agent`, `kill_agent`) and the restart of a lost agent.

Fast cases act on stand-in process trees (`sleep`); the soak over two real agents, killed
mid-soak by the nemesis or from outside, runs in `-m cp` / the nightly.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from scenarios.cli.main import main
from scenarios.nemesis.faults import Nemesis, Window
from scenarios.runner.multihost import LocalAgent, find_local_agent
from scenarios.sut.reference_executor import Executor
from tests.test_multihost_pool import _agent, _free_port, _kill_tree, _stop
from tests.test_nemesis_processes import _state


@pytest.fixture
def tree():
    """A stand-in agent: three sleeping processes, root first."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _armed(plan: list[Window], agents: dict[int, LocalAgent]) -> Nemesis:
    nem = Nemesis(kinds=tuple(sorted({w.kind for w in plan})), seed=1, nnodes=2)
    nem.for_torchrun()
    nem.plan = plan
    nem.arm([], agents=agents)
    return nem


def test_stop_agent_sigstops_the_whole_agent_for_its_window_then_sigconts(tree) -> None:
    agent = LocalAgent(1, tuple(p.pid for p in tree))
    nem = _armed([Window("stop_agent", 1, 0.05, 0.6)], {1: agent})
    time.sleep(0.3)
    assert [_state(p.pid) for p in tree] == ["T"] * 3
    time.sleep(0.6)
    assert all(_state(p.pid) != "T" for p in tree)
    nem.end_run()
    assert nem.counts()["stop_agent"] == 1 and nem.explain() is None
    assert "SIGSTOP agent of node 1" in nem.events[0].detail


def test_end_run_sigconts_a_stopped_agent(tree) -> None:
    nem = _armed([Window("stop_agent", 1, 0.0, 50.0)], {1: LocalAgent(1, (tree[0].pid,))})
    time.sleep(0.2)
    assert _state(tree[0].pid) == "T"
    nem.end_run()
    assert _state(tree[0].pid) != "T"


def test_kill_agent_sigkills_every_process_of_the_agent_and_names_it(tree) -> None:
    agent = LocalAgent(1, tuple(p.pid for p in tree))
    nem = _armed([Window("kill_agent", 1, 0.05, 1e9)], {1: agent})
    assert [p.wait(timeout=5) for p in tree] == [-9, -9, -9]
    nem.end_run()
    assert "SIGKILLed the agent of node 1" in (nem.explain() or "")
    assert nem.killed_agents == [agent]  # for the executor to start again
    nem.begin_run(2)
    assert nem.explain() is None


def test_an_agent_on_another_host_is_out_of_reach_and_said_so(tree) -> None:
    nem = _armed([Window("kill_agent", 1, 0.0, 1e9)], {})
    time.sleep(0.2)
    nem.end_run()
    assert all(p.poll() is None for p in tree)
    assert nem.explain() is None and nem.counts()["kill_agent"] == 0
    assert "not on this machine" in nem.events[0].detail


def test_agent_faults_pick_another_host_never_the_first() -> None:
    nem = Nemesis(kinds=("kill_agent", "stop_agent"), seed=5, rate=1.0, nnodes=3)
    nodes = {w.rank for _ in range(40) for w in nem.begin_run(8, expected_s=0.5)}
    assert nodes == {1, 2}


def test_a_pid_of_another_pool_or_host_is_not_an_agent_here(tree) -> None:
    assert find_local_agent(1, [tree[1].pid], "nosuchpool") is None


def test_agent_faults_without_hosts_are_one_line_exit_2(tmp_path, capsys) -> None:
    assert main(["soak", "--minutes", "0.02", "--mode", "torchrun", "--faults", "kill_agent",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nnodes N > 1" in err[0], err


def test_the_executor_restarts_a_lost_local_agent_and_stops_it_at_close(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    stamp = tmp_path / "started"
    argv = (sys.executable, "-c",
            f"import pathlib, time; pathlib.Path({str(stamp)!r}).write_text('x'); time.sleep(60)")
    ex = Executor("torchrun", nnodes=2, rdzv_endpoint="127.0.0.1:1")
    try:
        ex.local_agents = {1: LocalAgent(1, (dead.pid,), argv, str(tmp_path), ()),
                           2: LocalAgent(2, (alive.pid,), argv, str(tmp_path), ())}
        said = ex.restart_lost_agents()
        assert "agent of node 1 restarted" in said and "node 2" not in said
        restarted = ex._restarted[0]
        deadline = time.monotonic() + 20
        while not stamp.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stamp.exists() and restarted.poll() is None
    finally:
        ex.close()
        alive.kill()
        alive.wait()
    assert restarted.poll() is not None  # what it started, it stopped


# -- two real agents -----------------------------------------------------------------------------


def _agents_running(endpoint: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if endpoint in (p.info["cmdline"] or ()) and "agent" in (p.info["cmdline"] or ())]


def _soak(tmp_path: Path, endpoint: str, faults: str, minutes: str) -> tuple[int, dict]:
    out = tmp_path / "soak"
    rc = main(["soak", "--mode", "torchrun", "--layout", "1x2", "--nnodes", "2",
               "--rdzv-endpoint", endpoint, "--minutes", minutes, "--seed", "3",
               *(["--faults", faults] if faults else []), "--out", str(out)])
    return rc, json.loads((out / "latest" / "report.json").read_text())


@pytest.mark.cp
@pytest.mark.soak  # a minute or more on 2 cores: `-m cp` and the nightly
def test_kill_agent_mid_soak_is_unknown_for_that_run_and_the_soak_goes_on(tmp_path) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    agent = _agent(endpoint)
    try:
        rc, rep = _soak(tmp_path, endpoint, "kill_agent", "1.5")
    finally:
        _stop(agent)
    assert rc == 0, rep["verdict"]
    lost = [u for u in rep["unknown_runs"] if u.get("lost_agent")]
    assert rep["lost_runs"] == len(lost) >= 1
    assert "agent of node 1" in lost[0]["diagnosis"]
    assert rep["runs"] > lost[0]["run"]  # a restarted pool ran after the kill
    assert not _agents_running(endpoint)  # the agent the soak restarted, it stopped


@pytest.mark.cp
@pytest.mark.soak
def test_an_agent_lost_mid_soak_is_restarted_here_and_the_soak_goes_on(tmp_path) -> None:
    """No nemesis: the agent's whole tree dies from outside once the pool runs."""
    endpoint = f"127.0.0.1:{_free_port()}"
    agent = _agent(endpoint)
    killed = threading.Event()

    def kill_when_pooled() -> None:
        report = tmp_path / "soak" / "latest" / "report.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                if json.loads(report.read_text())["runs"] >= 1:  # the pool runs: lose the host
                    _kill_tree(agent.pid)
                    killed.set()
                    return
            time.sleep(0.2)

    t = threading.Thread(target=kill_when_pooled, daemon=True)
    t.start()
    try:
        rc, rep = _soak(tmp_path, endpoint, "", "1.5")
    finally:
        t.join(timeout=5)
        _stop(agent)
    assert killed.is_set()
    assert rc == 0, rep["verdict"]
    lost = [u for u in rep["unknown_runs"] if u.get("lost_agent")]
    assert rep["lost_runs"] == len(lost) == 1
    assert "agent 2 of 2" in lost[0]["diagnosis"] and "restarted here" in lost[0]["diagnosis"]
    assert rep["runs"] > lost[0]["run"]
    assert not _agents_running(endpoint)


def test_report_merge_sums_the_runs_lost_agents_cut() -> None:
    from scenarios.campaigns.report_merge import merge
    from tests.test_soak_shard import _rep

    reps = [_rep("agree", i + 1) for i in range(3)]
    reps[0]["lost_runs"], reps[2]["lost_runs"] = 1, 2
    m, _ = merge(reps, ["a", "b", "c"], {}, [])
    assert m["lost_runs"] == 3
