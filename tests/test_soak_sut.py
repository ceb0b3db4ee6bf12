"""`cpcheck soak --sut sglang==V`: a release soaks like the reference does (one campaign, one
report), and what a release cannot take is one line and exit 2 before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scenarios.cli.main import main
from tests.sglang_envs import POST, need


@pytest.mark.parametrize("extra, words", [
    (["--variant", "tp_only_sync"], "--variant tp_only_sync"),
    (["--protocol", "sglang-0.5.11"], "--protocol"),
    (["--faults", "slow_rank,storage_errors"], "--faults slow_rank,storage_errors"),
])
def test_what_a_release_soak_cannot_take_is_exit_2(tmp_path: Path, capsys, extra: list[str],
                                                   words: str) -> None:
    rc = main(["soak", "--sut", f"sglang=={POST}", "--minutes", "0.1",
               "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert words in err and f"sglang=={POST}" in err
    assert not (tmp_path / "o").exists()  # before any work


@pytest.mark.sglang
@pytest.mark.timeout(600)
def test_a_release_soaks_and_reports_like_any_soak(tmp_path: Path) -> None:
    need(POST)
    out = tmp_path / "o"
    rc = main(["soak", "--sut", f"sglang=={POST}", "--layout", "1x2", "--minutes", "0.25",
               "--seed", "3", "--out", str(out)])
    rep = json.loads((out / "latest" / "report.json").read_text())
    assert rc == 0, rep["verdict"]
    assert rep["complete"] and rep["status"] == "agree"
    assert rep["sut"] == f"sglang=={POST}" and rep["mode"] == "torchrun"
    assert rep["runs"] > 0 and rep["decisions"] > 0
