"""Bad input is one line naming file, line and field, and exit 2, before any work starts.

Each case here was accepted before and ran to AGREE (or printed a traceback).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scenarios.cli.main import main
from scenarios.core.schedule import Schedule, ScheduleError
from scenarios.generate.catalog import load_scenario

OP = '[[ops]]\nkind = "add"\nrid = "a"\nshared = 0\nshared_len = 8\nown_len = 3\n'
STEP = '[[ops]]\nkind = "step"\n'


@pytest.mark.parametrize(("text", "where", "needle"), [
    ("", "", "empty file"),
    ("   \n\n", "", "empty file"),
    ('name = "x"\n', "", "field 'ops': no ops"),
    (OP.replace("shared_len = 8", "shared_len = -8"), ":5:", "field 'ops.0.shared_len'"),
    (OP.replace("own_len = 3", "own_len = -1"), ":6:", "field 'ops.0.own_len'"),
    ('[[ops]]\nkind = "add"\nrid = "a"\ntokens = []\n', ":4:", "field 'ops.0.tokens'"),
    ('[[ops]]\nkind = "add"\nrid = "a"\ntokens = [1, -2]\n', ":4:", "field 'ops.0.tokens.1'"),
    # SGLang hashes token ids as 4-byte unsigned integers: it cannot hash a larger one
    ('[[ops]]\nkind = "add"\nrid = "a"\ntokens = [1, 4294967296]\n', ":4:",
     "field 'ops.0.tokens.1': Input should be less than 4294967296"),
    ('[[ops]]\nkind = "add"\nrid = ""\ntokens = [1]\n', ":3:", "field 'ops.0.rid'"),
    (OP + STEP + OP, ":11:", "field 'ops.2.rid': duplicate request id 'a'"),
    ('[[ops]]\nkind = "evict_host"\nn = -4\n', ":3:", "field 'ops.0.n'"),
    (OP + "[choices]\n0 = [1, -1]\n", ":8:", "field 'choices.0.1'"),
    (OP + "[choices]\n0 = [1]\n5 = [1]\n", ":9:", "field 'choices.5': rank 5 is outside"),
    (OP + '[faults]\n1 = [["gte", 0]]\n', ":8:", "field 'faults.1.0.0'"),
    (OP + '[faults]\n0 = [["get", -1]]\n', ":8:", "field 'faults.0.0.1'"),
    (OP + '[faults]\n2 = [["get", 0]]\n', ":8:", "field 'faults.2': rank 2 is outside"),
    (OP + "[clock_skew]\n1 = -3\n", ":8:", "field 'clock_skew.1'"),
    (OP + "[clock_skew]\n-1 = 3\n", ":8:", "field 'clock_skew.-1.[key]'"),
])
def test_bad_scenario_is_one_line_with_file_line_field(tmp_path: Path, capsys, text: str,
                                                       where: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScheduleError):
        load_scenario(str(path))
    assert main(["run", str(path), "--mode", "inprocess", "--replay-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{path}{where}" in err and needle in err, err


def test_good_scenario_still_runs(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(OP + STEP + "[choices]\n0 = [0, 1]\n1 = [1]\n[clock_skew]\n1 = 2\n"
                    '[faults]\n0 = [["get", 0]]\n')
    assert main(["run", str(path), "--mode", "inprocess", "--replay-dir", str(tmp_path)]) == 0


def test_empty_json_scenario(tmp_path: Path, capsys) -> None:
    path = tmp_path / "s.json"
    path.write_text("")
    assert main(["run", str(path), "--mode", "inprocess", "--replay-dir", str(tmp_path)]) == 2
    assert "empty file" in capsys.readouterr().err


def test_replay_file_with_bad_values_is_usage(tmp_path: Path, capsys) -> None:
    s = load_scenario("write_acks")
    data = {"schedule": {**json.loads(s.model_dump_json()), "clock_skew": {"7": 1}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data, indent=1))
    assert main(["replay", str(path), "--mode", "inprocess"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "field 'clock_skew.7'" in err and str(path) in err


@pytest.mark.parametrize("argv", [
    ["soak", "--minutes", "nan"], ["soak", "--minutes", "inf"], ["soak", "--minutes", "0"],
    ["soak", "--minutes", "-1"], ["soak", "--timeout", "0"], ["soak", "--timeout", "-2"],
    ["soak", "--timeout", "nan"], ["run", "write_acks", "--timeout", "0"],
    ["replay", "x.json", "--timeout", "-1"], ["explore", "--examples", "0"],
    ["explore", "--examples", "-1"], ["explore", "--timeout", "inf"],
])
def test_bad_numbers_are_usage_errors(tmp_path: Path, capsys, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, *(["--out", str(tmp_path)] if argv[0] == "soak" else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("must be" in err or "not a number" in err), err
    assert not (tmp_path / "latest").exists()  # no work started


def test_schedule_model_checks_directly() -> None:
    base = load_scenario("write_acks").model_dump()
    for change, field in (({"choices": {2: [0]}}, "choices.2"),
                          ({"faults": {0: [("exist", 0)]}}, "faults.0.0.0"),
                          ({"clock_skew": {0: -1}}, "clock_skew.0"),
                          ({"ops": []}, "ops")):
        with pytest.raises(ScheduleError, match=f"field '{field}'"):
            Schedule.from_dict({**base, **change}, "x")
    # the same Schedule on a bigger layout accepts those ranks
    Schedule.from_dict({**base, "layout": "2x2", "choices": {3: [0]}}, "x")
