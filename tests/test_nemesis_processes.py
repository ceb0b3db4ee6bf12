"""The nemesis on real processes (torchrun mode): SIGSTOP/SIGCONT, SIGKILL, worker plans."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from scenarios.core.records import RankResult
from scenarios.nemesis.faults import Nemesis, Window


def _state(pid: int) -> str:
    """"T" while the process is stopped (SIGSTOP), else psutil's status name."""
    status = psutil.Process(pid).status()
    return "T" if status == psutil.STATUS_STOPPED else status


@pytest.fixture
def sleeper():
    procs: list[subprocess.Popen] = []

    def make() -> subprocess.Popen:
        p = subprocess.Popen(["sleep", "60"])
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()
        p.wait()


def _armed(plan: list[Window], pids: list[int]) -> Nemesis:
    nem = Nemesis(kinds=tuple(sorted({w.kind for w in plan})), seed=1)
    nem.for_torchrun()
    nem.plan = plan
    nem.arm(pids)
    return nem


def test_slow_rank_sigstops_the_worker_for_its_window_then_sigconts(sleeper) -> None:
    a, b = sleeper(), sleeper()
    nem = _armed([Window("slow_rank", 1, 0.05, 0.6)], [a.pid, b.pid])
    time.sleep(0.3)
    assert _state(b.pid) == "T" and _state(a.pid) != "T"
    time.sleep(0.6)
    assert _state(b.pid) != "T"
    nem.end_run()
    assert nem.counts()["slow_rank"] == 1
    assert "SIGSTOP rank 1" in nem.events[0].detail


def test_end_run_always_sigconts_a_stopped_worker(sleeper) -> None:
    a = sleeper()
    nem = _armed([Window("slow_rank", 0, 0.0, 50.0)], [a.pid])
    time.sleep(0.2)
    assert _state(a.pid) == "T"
    nem.end_run()  # the run ended early: the worker must not stay frozen
    assert _state(a.pid) != "T"


def test_kill_rank_sigkills_the_worker_and_explains_the_broken_run(sleeper) -> None:
    a, b = sleeper(), sleeper()
    nem = _armed([Window("kill_rank", 0, 0.05, 1e9)], [a.pid, b.pid])
    assert a.wait(timeout=5) == -9
    nem.end_run()
    assert b.poll() is None
    assert "SIGKILLed rank 0" in (nem.explain() or "")
    nem.begin_run(2)  # the next run starts clean: a failure there is not explained away
    assert nem.explain() is None


def test_storage_latency_sigstops_the_master(sleeper) -> None:
    m = sleeper()

    class _Master:
        pid = m.pid

        def restart(self) -> None:
            raise AssertionError("not asked for")

    nem = Nemesis(kinds=("storage_latency",), seed=1)
    nem.for_torchrun()
    nem.attach_master(_Master())
    nem.plan = [Window("storage_latency", -1, 0.0, 0.5, delay_s=0.01)]
    assert nem.arm([]) is None  # nothing for the workers: the master itself is frozen
    time.sleep(0.2)
    assert _state(m.pid) == "T"
    nem.end_run()
    assert _state(m.pid) != "T"


def test_storage_errors_travel_to_the_worker_and_fire_there() -> None:
    nem = Nemesis(kinds=("storage_errors",), seed=1)
    nem.for_torchrun()
    nem.plan = [Window("storage_errors", 1, 0.0, 5.0, probability=1.0)]
    wire = nem.arm([111, 222])
    worker = Nemesis.from_wire(json.loads(json.dumps(wire)))  # as the pool pickles it
    assert worker is not None
    assert worker.storage_fails(1, "get") and not worker.storage_fails(0, "get")
    nem.collect([RankResult(rank=1, nemesis_injected=dict(worker.injected)), RankResult(rank=0)])
    nem.end_run()
    assert nem.counts()["storage_errors"] == 1


def test_kills_are_spaced_under_torchrun() -> None:
    nem = Nemesis.parse("kill_rank", seed=0)
    nem.for_torchrun()
    nem.rate = 1.0
    assert nem.begin_run(2) and not nem.begin_run(2)  # a kill costs a pool restart


@pytest.mark.cp
def test_process_faults_hit_real_torchrun_workers_and_a_killed_pool_comes_back() -> None:
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.checker import check
    from scenarios.runner import RankDiedError
    from scenarios.sut.reference_executor import Executor

    s = load_scenario("prefetch_batches").with_(layout="1x2")
    nem = Nemesis(kinds=("slow_rank", "kill_rank", "storage_errors"), seed=3)
    nem.for_torchrun()
    with Executor("torchrun", timeout_s=10.0) as ex:
        # a SIGSTOP from the run's first instant: it always lands inside the run
        nem.plan = [Window("slow_rank", 1, 0.0, 0.3),
                    Window("storage_errors", 0, 0.0, 60.0, probability=1.0)]
        results = ex.run(s, gated=False, nemesis=nem)
        nem.end_run()
        assert check(s, results).ok
        assert nem.counts()["slow_rank"] == 1
        assert nem.counts()["storage_errors"] >= 1  # fired inside worker 0, counted here
        assert results[0].recorded.faults and not results[1].recorded.faults
        pids = [r.pid for r in ex.pool("1x2").ranks]
        nem.begin_run(2)
        nem.plan = [Window("kill_rank", 0, 0.0, 1e9)]
        with pytest.raises(RankDiedError):
            ex.run(s, gated=False, nemesis=nem)
        nem.end_run()
        assert "SIGKILLed rank 0" in (nem.explain() or "")
        assert nem.counts()["kill_rank"] == 1
        nem.begin_run(2)
        nem.plan = []
        assert check(s, ex.run(s, gated=False, nemesis=nem)).ok  # a fresh pool took over
        nem.end_run()
        assert not set(pids) & {r.pid for r in ex.pool("1x2").ranks}
        assert nem.explain() is None


@pytest.mark.cp
def test_torchrun_soak_with_process_faults_writes_faults_to_report_and_plot(tmp_path) -> None:
    from scenarios.cli.main import main

    out = tmp_path / "soak"
    # --min-runs: on a loaded box the 18 s held one run, and the kill cut it (nothing judged)
    rc = main(["soak", "--mode", "torchrun", "--layout", "1x2", "--minutes", "0.3", "--min-runs",
               "2", "--seed", "4", "--faults", "slow_rank,storage_latency,kill_rank", "--out",
               str(out)])
    rep = json.loads((out / "latest" / "report.json").read_text())
    assert rc == 0, rep["verdict"]
    assert rep["mode"] == "torchrun" and rep["seed"] == 4
    assert set(rep["faults"]) == {"slow_rank", "storage_latency", "kill_rank"}
    # how many fire depends on this machine's speed (tested exactly above); each one is logged
    assert len(rep["fault_events"]) >= rep["faults"]["slow_rank"] + rep["faults"]["kill_rank"]
    # a kill that lands as a run finishes leaves that run judged (and the pool restarted)
    assert len(rep["unknown_runs"]) <= rep["faults"]["kill_rank"]
    assert all("SIGKILLed" in u["diagnosis"] for u in rep["unknown_runs"])
    assert (out / "latest" / "faults.png").stat().st_size > 0


@pytest.mark.cp
def test_torchrun_soak_with_faults_finds_a_bad_variant_and_its_replay_reproduces(
        tmp_path) -> None:
    from scenarios.cli.main import main

    out = tmp_path / "soak"
    rc = main(["soak", "--mode", "torchrun", "--layout", "1x2", "--variant", "leak_on_revoke",
               "--minutes", "1", "--seed", "2", "--faults", "slow_rank,storage_errors",
               "--out", str(out)])
    assert rc == 1, "the torchrun soak did not find leak_on_revoke"
    rep = json.loads((out / "latest" / "report.json").read_text())
    replay = Path(rep["replay"])
    assert json.loads(replay.read_text())["mode"] == "torchrun"
    assert main(["replay", str(replay), "--mode", "torchrun"]) == 1
