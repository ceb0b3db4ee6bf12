"""`cpcheck soak` draws a fresh seed unless --seed pins it, and records it."""

from __future__ import annotations

import json
from pathlib import Path

from scenarios.cli.main import main


def _seed(tmp_path: Path, name: str, *extra: str) -> int:
    out = tmp_path / name
    assert main(["soak", "--minutes", "0.01", "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())["seed"]


def test_default_seed_is_fresh_printed_and_recorded(tmp_path: Path, capsys) -> None:
    a, b = _seed(tmp_path, "a"), _seed(tmp_path, "b")
    assert a != b  # two nights, two seeds (1 in 2**31 chance of a false failure)
    assert f"seed {a}" in capsys.readouterr().err


def test_seed_pins_the_run(tmp_path: Path) -> None:
    assert _seed(tmp_path, "c", "--seed", "42") == 42
