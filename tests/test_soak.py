"""Soak and nemesis: fast checks that every fault kind fires and every run ends (no hang)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from scenarios.cli.main import main
from scenarios.nemesis.faults import KINDS, Nemesis, NemesisError, RankKilled


def _soak(tmp_path: Path, *extra: str, minutes: str = "0.05") -> tuple[int, dict]:
    out = tmp_path / "soak"
    rc = main(["soak", "--minutes", minutes, "--seed", "3", "--out", str(out), *extra])
    return rc, json.loads((out / "report.json").read_text())


def test_fixed_soak_agrees_and_writes_report(tmp_path: Path) -> None:
    rc, rep = _soak(tmp_path, minutes="0.1")
    assert rc == 0, rep["verdict"]
    assert rep["runs"] > 0 and rep["decisions"] > 0 and rep["replay"] is None
    for png in ("decisions_per_s.png", "prefetch_outcomes.png", "host_pool.png"):
        assert (tmp_path / "soak" / png).stat().st_size > 0


@pytest.mark.parametrize("kind", ["slow_rank", "storage_latency", "storage_errors"])
def test_fault_kind_is_injected_and_run_ends_cleanly(tmp_path: Path, kind: str) -> None:
    rc, rep = _soak(tmp_path, "--faults", kind)
    assert rep["faults"][kind] > 0 and rep["faults_never_fired"] == []
    assert rc == 0, rep["verdict"]


def test_master_restart_without_a_master_of_our_own_is_refused(tmp_path: Path, capsys) -> None:
    # memory backend: there is no master to restart, so saying it fired would be a lie
    assert main(["soak", "--faults", "master_restart", "--out", str(tmp_path)]) == 2
    assert "needs a Mooncake master" in capsys.readouterr().err


def test_kill_rank_run_is_unknown_with_a_diagnosis_not_a_divergence(tmp_path: Path) -> None:
    """A killed rank is infrastructure: its run is `unknown` (with a diagnosis), never a
    divergence with a replay file; the kill was asked for, so the soak goes on."""
    rc, rep = _soak(tmp_path, "--faults", "kill_rank", "--timeout", "2")
    assert rep["faults"]["kill_rank"] >= 1
    assert len(rep["unknown_runs"]) >= 1
    assert "killed rank" in rep["unknown_runs"][0]["diagnosis"]
    assert "nemesis killed" in rep["unknown_diagnoses"][0]
    assert rep["replay"] is None and not list((tmp_path / "soak").glob("replay-*"))
    assert any(e["kind"] == "kill_rank" for e in rep["fault_events"])
    if rep["runs"] > len(rep["unknown_runs"]):  # some runs were judged, and they agreed
        assert rc == 0 and rep["status"] == "agree", rep["verdict"]
    else:  # every run was cut (a loaded host gets few runs in 3 s): nothing judged
        assert rc == 125 and "no run was judged" in rep["verdict"]["diagnosis"]


def test_kill_rank_raises_in_io_thread() -> None:
    nem = Nemesis.parse("kill_rank", seed=0)
    nem.rate = 1.0
    plan = nem.begin_run(2)
    victim = plan[0].rank
    with pytest.raises(RankKilled):
        nem.io_delay(victim, "write")
    nem.io_delay(1 - victim, "write")  # the other rank is untouched
    nem.end_run()


def test_windows_follow_the_length_of_the_runs_seen() -> None:
    """Windows are placed inside the expected run length; the first run measured replaces the
    0.5 s guess outright (a slow average left most windows after 70 ms runs had ended)."""
    nem = Nemesis.parse("storage_latency", seed=0)
    nem.rate = 1.0
    assert max(w.start_s for w in nem.begin_run(2)) <= 0.25
    time.sleep(0.01)
    nem.end_run()
    starts = []
    for _ in range(20):
        starts += [w.start_s for w in nem.begin_run(2)]
        nem.end_run()  # immediate: runs stay short
    assert starts and max(starts) <= 0.05 * 0.5


def test_a_fault_that_never_fires_is_reported(tmp_path: Path, monkeypatch) -> None:
    begin = Nemesis.begin_run

    def never(self: Nemesis, *a, **k) -> list:  # noqa: ANN002, ANN003
        self.rate = 0.0  # every plan is empty: nothing can fire
        return begin(self, *a, **k)

    monkeypatch.setattr(Nemesis, "begin_run", never)
    rc, rep = _soak(tmp_path, "--faults", "slow_rank", minutes="0.02")
    assert rc == 0 and rep["faults"] == {"slow_rank": 0}
    assert rep["faults_never_fired"] == ["slow_rank"]


def test_parse_rejects_unknown_kind() -> None:
    with pytest.raises(NemesisError, match="unknown fault kind 'bogus'"):
        Nemesis.parse("slow_rank,bogus")
    assert Nemesis.parse("").kinds == ()
    assert Nemesis.parse(",".join(KINDS)).kinds == KINDS


def test_cli_rejects_unknown_fault_kind(tmp_path: Path) -> None:
    assert main(["soak", "--faults", "bogus", "--out", str(tmp_path)]) == 2


def test_plans_are_deterministic_given_a_seed() -> None:
    a, b = Nemesis.parse("slow_rank,storage_errors", seed=7), Nemesis.parse(
        "slow_rank,storage_errors", seed=7)
    assert [a.begin_run(4) for _ in range(5)] == [b.begin_run(4) for _ in range(5)]


@pytest.mark.soak
def test_tp_only_sync_soak_finds_divergence_and_replay_reproduces(tmp_path: Path) -> None:
    rc, rep = _soak(tmp_path, "--variant", "tp_only_sync", minutes="1")
    assert rc == 1 and rep["replay"]
    assert main(["replay", rep["replay"], "--mode", "inprocess"]) == 1
