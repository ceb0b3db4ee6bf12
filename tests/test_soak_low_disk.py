"""Low disk on --out (issue 23: nothing found is lost): a disk that falls below the room the
soak keeps for its report stops new runs and ends the soak `unknown`, report written; a disk
low from the start is said and the soak runs on (a divergence is printed before any write)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import scenarios.campaigns.soak as soak
from scenarios.cli.main import main
from scenarios.store.report import SoakReport


def _probe(monkeypatch, free: list[int]) -> None:  # noqa: ANN001
    """free_bytes answers `free` in turn, then its last value for ever."""
    calls = iter(free)
    last = [free[-1]]

    def probe(path: Path) -> int:
        last[0] = next(calls, last[0])
        return last[0]

    monkeypatch.setattr(soak, "free_bytes", probe)


@pytest.mark.parametrize("seed", ["1", "7"])
def test_a_disk_that_falls_low_stops_new_runs_and_ends_unknown(tmp_path: Path, monkeypatch,
                                                               capsys, seed: str) -> None:
    # start-up and two runs with room, then 5 MiB
    _probe(monkeypatch, [1 << 30] * 3 + [5 << 20])
    rc = main(["soak", "--minutes", "0.5", "--seed", seed, "--out", str(tmp_path), "--json"])
    cap = capsys.readouterr()
    assert rc == 125, cap.out + cap.err
    rep = SoakReport.load(tmp_path / "latest")
    assert rep.complete and rep.status == "unknown" and rep.runs == 2
    assert "disk low on --out (5.0 MiB free, below 16.0 MiB)" in rep.verdict["message"]
    assert "disk low on --out" in cap.out
    assert json.loads(cap.out.strip().splitlines()[-1])["exit_code"] == 125


def test_a_divergence_found_before_the_disk_fell_keeps_exit_1(tmp_path: Path, monkeypatch,
                                                              capsys) -> None:
    _probe(monkeypatch, [1 << 30] * 2 + [5 << 20])
    rc = main(["soak", "--minutes", "0.5", "--variant", "cp_rank_in_key", "--seed", "1",
               "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1, cap.out + cap.err
    assert "DIVERGE [" in cap.out and list((tmp_path / "latest").glob("replay-*.json"))


def test_a_disk_low_from_the_start_is_said_and_the_soak_runs_on(tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    _probe(monkeypatch, [5 << 20])
    rc = main(["soak", "--minutes", "0.03", "--seed", "2", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 0, cap.out + cap.err
    rep = SoakReport.load(tmp_path / "latest")
    assert rep.runs >= 1 and any("disk low on --out at the start" in x for x in rep.not_saved)
