"""A soak divergence that does not replay is kept and the soak hunts on for one that does.

The nemesis-free soak of a known-bad variant finds its divergence within a run or two; here the
confirmation step is planted to fail (as it does when a run read IO progress its recording
could not pin), once or always.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import scenarios.judge.judging as judge
from scenarios.campaigns.soak import MAX_UNCONFIRMED
from scenarios.cli.main import main
from scenarios.core.verdict import Verdict

VARIANT = "tp_only_sync"


def _soak(out: Path) -> int:
    return main(["soak", "--variant", VARIANT, "--minutes", "0.5", "--out", str(out),
                 "--seed", "3"])


def _not_reproduced(first: Verdict) -> Verdict:
    v = Verdict.unknown(f"flaky: DIVERGE [{first.invariant}] did not reproduce on replay "
                        "(planted)", invariant=first.invariant, failures=first.failures,
                        stats={"confirmed_by_replay": False})
    v.message = first.message
    return v


def test_an_unreproduced_divergence_is_kept_and_the_hunt_goes_on(monkeypatch, tmp_path,
                                                                 capsys) -> None:
    real, calls = judge.confirm, []

    def once_flaky(ex, s, first):  # noqa: ANN001, ANN202
        calls.append(first.status)
        return _not_reproduced(first) if len(calls) == 1 else real(ex, s, first)

    monkeypatch.setattr(judge, "confirm", once_flaky)
    assert _soak(tmp_path) == 1
    rep = json.loads((tmp_path / "report.json").read_text())
    (u,) = rep["unconfirmed_divergences"]
    assert "planted" in u["diagnosis"] and Path(u["file"]).name.startswith("unknown-")
    assert json.loads(Path(u["file"]).read_text())["verdict"]["status"] == "unknown"
    assert rep["status"] == "diverge" and rep["confirmed_by_replay"] is True
    assert Path(rep["replay"]).name.startswith("replay-") and len(calls) == 2
    assert "1 divergence(s) did not reproduce on replay" in capsys.readouterr().out


def test_only_unreproduced_divergences_end_unknown(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(judge, "confirm", lambda ex, s, first: _not_reproduced(first))
    assert _soak(tmp_path) == 125
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["status"] == "unknown" and len(rep["unconfirmed_divergences"]) == MAX_UNCONFIRMED
    assert rep["replay"] == rep["unconfirmed_divergences"][0]["file"]
    out = capsys.readouterr().out
    assert "did not reproduce on replay (planted)" in out and "not reproduced; both verdicts" in out


@pytest.mark.parametrize("seed", [3, 4])
def test_a_divergence_that_replays_still_ends_the_soak_at_once(tmp_path, seed: int) -> None:
    """Budget: one 0.5-minute soak per seed; tp_only_sync is found in the first runs."""
    assert main(["soak", "--variant", VARIANT, "--minutes", "0.5", "--out", str(tmp_path),
                 "--seed", str(seed)]) == 1
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["unconfirmed_divergences"] == [] and rep["seconds"] < 20


def test_ctrl_c_after_an_unreproduced_divergence_still_reports_it(monkeypatch, tmp_path) -> None:
    """Interrupted while hunting on: the kept divergence is the verdict (unknown, 125), not
    "every run so far agreed" (130)."""
    real_run, kept = judge.run_checked, []

    def flaky(ex, s, first):  # noqa: ANN001, ANN202
        kept.append(first)
        return _not_reproduced(first)

    def interrupt_after_one(*a, **k):  # noqa: ANN002, ANN003, ANN202
        if kept:
            raise KeyboardInterrupt
        return real_run(*a, **k)

    monkeypatch.setattr(judge, "confirm", flaky)
    monkeypatch.setattr(judge, "run_checked", interrupt_after_one)
    assert _soak(tmp_path) == 125
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["interrupted"] is True and rep["status"] == "unknown"
    assert rep["replay"] == rep["unconfirmed_divergences"][0]["file"]
