"""Bad input is exit 2 with the file, line and field (issue 23): scenario fields of the wrong
type, an abort of a request nobody added, replay files whose top-level fields disagree with
their schedule; a release a replay file names that this commit does not know is 125."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scenarios.cli.main import main
from scenarios.core.config import CORPUS_DIR

ADD = 'name = "x"\nlayout = "1x2"\n[[ops]]\nkind = "add"\nrid = "a"\nshared = 0\n'


@pytest.mark.parametrize(("text", "needle"), [
    (ADD + 'shared_len = "sixteen"\nown_len = 3\n[[ops]]\nkind = "step"\n',
     ":7: field 'ops.0.shared_len': want an integer (got 'sixteen')"),
    (ADD + 'shared_len = 16\nown_len = true\n[[ops]]\nkind = "step"\n',
     ":8: field 'ops.0.own_len': want an integer"),
    (ADD + 'shared_len = 16\nown_len = 3\n[[ops]]\nkind = "abort"\nrid = "zzz"\n',
     "field 'ops.1.rid': abort of request id 'zzz' that no earlier op added"),
])
def test_bad_scenario_fields_are_exit_2_with_line_and_field(tmp_path: Path, capsys, text: str,
                                                            needle: str) -> None:
    f = tmp_path / "s.toml"
    f.write_text(text)
    assert main(["run", str(f), "--mode", "inprocess", "--replay-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0] and needle in err[0], err
    assert "internal error" not in err[0]


def _corpus_file(name_start: str) -> dict:
    path = next(p for p in sorted(CORPUS_DIR.glob(f"{name_start}*.json")))
    return json.loads(path.read_text())


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("kind", "something-else", "is not 'cpcheck-replay'"),
    ("mode", "threads", "is not 'inprocess' or 'torchrun'"),
    ("sut", "sglang==0.5.10", "disagrees with the schedule's sut 'reference'"),
    ("profile", "sglang-0.5.11", "disagrees with the schedule's protocol"),
    ("verdict", "diverge", "want dict"),
    ("written", 12, "want str"),
])
def test_every_top_level_field_of_a_replay_is_checked(tmp_path: Path, capsys, field: str,
                                                      value: object, needle: str) -> None:
    data = _corpus_file("replay-tp_only_sync-2x2")
    data["schedule"]["protocol"] = data["schedule"].get("protocol", "sglang-0.5.20")
    data["profile"] = data["schedule"]["protocol"]
    data[field] = value
    f = tmp_path / "r.json"
    f.write_text(json.dumps(data))
    assert main(["replay", str(f), "--mode", "inprocess"]) == 2
    err = capsys.readouterr().err
    assert f"{f}: field '{field}': " in err and needle in err, err


def test_an_unknown_release_named_by_a_replay_file_is_125(tmp_path: Path, capsys) -> None:
    data = _corpus_file("replay-tp_only_sync-2x2")
    data["schedule"]["sut"] = "sglang==0.5.99"
    data.pop("sut", None)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(data))
    assert main(["replay", str(f), "--mode", "inprocess"]) == 125
    assert "0.5.99" in capsys.readouterr().err


def test_replay_runs_a_3x3_inprocess_file_that_run_accepts(tmp_path: Path, monkeypatch) -> None:
    import scenarios.runner as runner

    monkeypatch.setattr(runner, "max_ranks_here", lambda: 4)  # a small host: 9 processes won't fit
    data = _corpus_file("replay-tp_only_sync-2x2")
    data["schedule"]["layout"] = "3x3"
    data["schedule"]["choices"] = {}
    data["schedule"].pop("faults", None)
    data["mode"] = "inprocess"
    f = tmp_path / "r.json"
    f.write_text(json.dumps(data))
    assert main(["replay", str(f), "--mode", "inprocess"]) in (0, 1)  # judged, not refused
    assert main(["replay", str(f), "--mode", "torchrun"]) == 125  # 9 processes: refused
