"""Faults inside gated coverage chunks, and the one fault model (`FaultEvent`) of issue 23.

A gated chunk's IO timing is scripted by its Schedule; the nemesis still acts in it (delays and
kills before the gate, storage errors through `fail`), and the storage calls it failed are kept
so the soak's replay of a gated chunk scripts them and replays the run that was judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scenarios.campaigns.report_merge import load_report, merge
from scenarios.cli.main import main
from scenarios.core.fault_event import FaultEvent, count_events
from scenarios.generate.catalog import load_scenario
from scenarios.nemesis.faults import Nemesis, Window
from scenarios.store.report import SoakReport
from scenarios.sut.reference_executor import Executor


def _storage_errors(seed: int) -> Nemesis:
    nem = Nemesis.parse("storage_errors", seed=seed)
    nem.begin_run(2, run=1, gated=True)
    nem.plan = [Window("storage_errors", -1, 0.0, 1e9, probability=0.5)]
    return nem


def _calls(r) -> list[tuple]:  # noqa: ANN001
    """A rank's storage calls and which succeeded (keys carry the run id: not compared)."""
    return [(c.op, len(c.keys), c.ok) for c in r.storage]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_storage_errors_in_a_gated_run_are_scripted_into_its_replay(seed: int) -> None:
    s = load_scenario("prefetch_batches")
    nem = _storage_errors(seed)
    with Executor("inprocess", timeout_s=5.0) as ex:
        faulted = ex.run(s, gated=True, nemesis=nem)
        nem.end_run()
        injected = {r.rank: list(r.injected_faults) for r in faulted}
        assert any(injected.values()), "the nemesis failed no storage call of a gated run"
        assert nem.counts()["storage_errors"] >= 1
        assert all(e.gated and e.run == 1 for e in nem.events)
        # the replay Schedule (as the soak builds it) gives the run that was judged
        rep = s.with_(faults={r: [list(f) for f in s.faults.get(r, [])] + [list(f) for f in fs]
                              for r, fs in injected.items()})
        replayed = ex.run(rep, gated=True)
        plain = ex.run(s, gated=True)
    for a, b in zip(faulted, replayed, strict=True):
        assert _calls(a) == _calls(b) and a.decisions == b.decisions
    # and the faults mattered: without them the run's storage calls are not the same
    assert [_calls(r) for r in plain] != [_calls(r) for r in faulted]


def test_a_gated_run_meets_delays_and_kills() -> None:
    """slow_rank delays and kill_rank acts through the gated pacer too."""
    from scenarios.client.gates import GatedPacer
    from scenarios.core.errors import RankKilled

    nem = Nemesis.parse("slow_rank,kill_rank", seed=0)
    nem.begin_run(2, gated=True)
    nem.plan = [Window("slow_rank", 0, 0.0, 1e9, delay_s=0.001),
                Window("kill_rank", 1, 0.0, 1e9)]
    p0 = GatedPacer(0, [], [], nemesis=nem)
    p0.release_all()
    p0.before("write", 0)
    p0.before("write", 1)
    with pytest.raises(RankKilled):
        GatedPacer(1, [], [], nemesis=nem).before("write", 0)
    assert nem.counts() == {"slow_rank": 1, "kill_rank": 1}  # one event per window
    slow = next(e for e in nem.events if e.kind == "slow_rank")
    assert slow.hits == 2 and slow.gated


def test_faults_count_events_one_for_one(tmp_path: Path) -> None:
    """`faults` and `fault_events` are one model: the counts are the events, per kind."""
    assert main(["soak", "--minutes", "0.05", "--seed", "5", "--faults",
                 "slow_rank,storage_errors", "--out", str(tmp_path)]) == 0
    rep = SoakReport.load(tmp_path / "latest")
    assert rep.schema_ == 4 and sum(rep.faults.values()) > 0
    assert rep.faults == count_events(rep.fault_events, rep.faults)
    assert all(isinstance(e, FaultEvent) and e.hits >= 1 and e.run >= 1
               for e in rep.fault_events)


def _v3_report(folder: Path) -> Path:
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({
        "schema": 3, "runs": 10, "status": "agree", "verdict": {"status": "agree"},
        "faults": {"slow_rank": 57, "storage_errors": 0},
        "fault_runs": {"runs": 10, "faultable_runs": 7,
                       "by_kind": {"slow_rank": {"runs": 2, "share": 0.2}}},
        "fault_events": [{"t": 1.0, "kind": "slow_rank", "rank": 0, "detail": "window"},
                         {"t": 2.0, "kind": "slow_rank", "rank": 1, "detail": "window"}]}))
    return folder


def test_old_reports_are_read_in_the_one_fault_model(tmp_path: Path) -> None:
    """A schema-3 report counted hits in `faults`: it is read with its events recounted."""
    old = _v3_report(tmp_path / "old")
    rep = SoakReport.load(old)
    assert rep.faults == {"slow_rank": 2, "storage_errors": 0}
    assert [e.hits for e in rep.fault_events] == [None, None]
    data = load_report(old)
    merged, _ = merge([data, data], ["a", "b"], {}, [])
    assert merged["faults"] == {"slow_rank": 4, "storage_errors": 0}
    assert merged["faults_never_fired"] == ["storage_errors"]
    assert merged["fault_runs"]["gated_runs"] == 6
    assert merged["fault_runs"]["by_kind"]["slow_rank"] == {"runs": 4, "share": 0.2,
                                                            "gated_runs": 0}


@pytest.mark.soak
@pytest.mark.mooncake
def test_a_2x2_mooncake_fault_soak_meets_faults_in_gated_chunks(tmp_path: Path) -> None:
    """Issue 23's soak (2x2, Mooncake, its own master, every fault but kill_rank: in-process a
    kill costs a whole timeout): gated coverage chunks run, and faults fire inside them."""
    rc = main(["soak", "--layout", "2x2", "--backend", "mooncake", "--minutes", "1",
               "--seed", "4", "--timeout", "5", "--faults",
               "slow_rank,storage_latency,storage_errors,master_restart", "--out",
               str(tmp_path)])
    rep = SoakReport.load(tmp_path / "latest")
    assert rc == 0, rep.verdict
    fr = rep.fault_runs
    assert fr["gated_runs"] > 0, fr
    assert sum(v["gated_runs"] for v in fr["by_kind"].values()) > 0, fr
    assert any(e.gated for e in rep.fault_events)
