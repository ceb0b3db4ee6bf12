"""The exit-code contract: every subcommand ends with 0, 1, 2 or 125, chosen by exception type.

Each subcommand is driven to each code it can reach, in-process and on cheap cases; the README
table and `--help` print the same table as scenarios/core/contract.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import scenarios.cli.main as cli
from scenarios.cli.main import main
from scenarios.core.contract import TABLE, ExitCode, classify
from scenarios.core.errors import CannotJudge, UsageError
from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check
from scenarios.store.replay import write_replay

REPO = Path(__file__).resolve().parent.parent
NO_MASTER = ["--backend", "mooncake", "--mooncake-master", "127.0.0.1:1"]  # nothing listens


def _replay_file(tmp_path: Path, variant: str = "fixed", layout: str = "1x2", **top) -> Path:
    s = load_scenario("write_acks").with_(variant=variant, layout=layout)
    path = tmp_path / f"{variant}-{layout}.json"
    path.write_text(json.dumps({"schedule": json.loads(s.model_dump_json()), **top}))
    return path


def _one_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # stdout carries the JSON object and nothing else
    return json.loads(out[0])


# -- classification by type ----------------------------------------------------------------
def test_classify_reads_types_not_words() -> None:
    # today's cli mapped any RuntimeError saying "start" to 125 and the rest to 2
    assert classify(RuntimeError("call start() to run again"))[0] == ExitCode.UNKNOWN
    assert classify(UsageError("cannot start: bad flag"))[0] == ExitCode.USAGE
    assert classify(CannotJudge("master unreachable"))[0] == ExitCode.UNKNOWN
    # an unanticipated exception is an internal error: 125 with a diagnosis, never 1 or 2
    code, line = classify(ValueError("boom"))
    assert code == ExitCode.UNKNOWN and line == "internal error: ValueError: boom"
    assert classify(KeyError("x"))[0] == ExitCode.UNKNOWN
    assert classify(KeyboardInterrupt())[0] == ExitCode.INTERRUPTED


def test_runner_failures_are_unknown() -> None:
    from scenarios.runner.torchrun_pool import RankDiedError, RankPoolConfigError

    died = RankDiedError("rank 1 killed by SIGKILL; call start() to run again", 1, -9)
    assert classify(died)[0] == ExitCode.UNKNOWN
    assert classify(RankPoolConfigError("8 ranks; this machine runs at most 4"))[0] == 125


@pytest.mark.parametrize("cmd", ["run", "replay", "explore"])
def test_internal_error_exits_125_not_1(monkeypatch, tmp_path: Path, capsys, cmd: str) -> None:
    from scenarios.sut.reference_executor import Executor

    def broken(self, s, **kw):  # noqa: ANN001, ANN003, ANN202
        raise ValueError("an internal bug, not a verdict")

    monkeypatch.setattr(Executor, "run", broken)
    argv = {"run": ["run", "write_acks", "--replay-dir", str(tmp_path)],
            "replay": ["replay", str(_replay_file(tmp_path))],
            "explore": ["explore", "--examples", "2", "--layout", "1x2",
                        "--replay-dir", str(tmp_path)]}[cmd]
    assert main([*argv, "--mode", "inprocess"]) == 125
    err = capsys.readouterr().err
    assert "cannot judge here: internal error: ValueError: an internal bug" in err


# -- each subcommand, each code ------------------------------------------------------------
def test_version_and_list(monkeypatch, capsys) -> None:
    assert main(["version"]) == 0
    assert main(["list"]) == 0
    for argv in (["version", "--bogus"], ["list", "extra"], ["nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    import scenarios.generate.catalog

    monkeypatch.setattr(scenarios.generate.catalog, "catalog_names",
                        lambda: (_ for _ in ()).throw(RuntimeError("catalog unreadable")))
    assert main(["list"]) == 125


def test_run_codes(tmp_path: Path, capsys) -> None:
    base = ["--mode", "inprocess", "--replay-dir", str(tmp_path / "out")]
    assert main(["run", "write_acks", *base]) == 0
    assert main(["run", "write_acks", "--layout", "2x2", "--variant", "tp_only_sync", *base]) == 1
    assert "confirmed by replay" in capsys.readouterr().out
    assert main(["run", "nope", *base]) == 2
    assert main(["run", "write_acks", "--variant", "nope", *base]) == 2
    (tmp_path / "file").write_text("")
    assert main(["run", "write_acks", "--mode", "inprocess", "--replay-dir",
                 str(tmp_path / "file" / "sub")]) == 2
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            main(["run", "write_acks", "--timeout", bad, *base])
        assert e.value.code == 2
    assert main(["run", "write_acks", *NO_MASTER, *base]) == 125


def test_replay_codes(monkeypatch, tmp_path: Path, capsys) -> None:
    ip = ["--mode", "inprocess"]
    assert main(["replay", str(_replay_file(tmp_path)), *ip]) == 0
    assert main(["replay", str(_replay_file(tmp_path, "tp_only_sync", "2x2")), *ip]) == 1
    assert main(["replay", str(tmp_path / "missing.json"), *ip]) == 2
    (tmp_path / "empty.json").write_text("")
    assert main(["replay", str(tmp_path / "empty.json"), *ip]) == 2
    bad_layout = _replay_file(tmp_path)
    data = json.loads(bad_layout.read_text())
    data["schedule"]["layout"] = "2y2"
    bad_layout.write_text(json.dumps(data))
    assert main(["replay", str(bad_layout), *ip]) == 2
    assert main(["replay", str(_replay_file(tmp_path)), *ip, *NO_MASTER]) == 125
    capsys.readouterr()


def test_replay_from_another_commit_is_125_not_2(tmp_path: Path, capsys) -> None:
    """A file naming a variant / field / schema this commit does not know: bisect must skip."""
    ip = ["--mode", "inprocess"]
    newer = _replay_file(tmp_path, schema=99)
    assert main(["replay", str(newer), *ip]) == 125
    for change in ({"variant": "from_the_future"}, {"version": 2}, {"sut": "sglang"},
                   {"protocol": "v3"}):
        path = _replay_file(tmp_path)
        data = json.loads(path.read_text())
        data["schedule"].update(change)
        path.write_text(json.dumps(data))
        assert main(["replay", str(path), *ip]) == 125, change
    assert "cannot judge here" in capsys.readouterr().err


def test_replay_too_many_ranks_uses_the_hosts_limit(monkeypatch, tmp_path: Path, capsys) -> None:
    """Not a layout assumed too big for any host: the limit comes from max_ranks_here."""
    import scenarios.runner.torchrun_pool as pool

    path = _replay_file(tmp_path, layout="2x2")
    monkeypatch.setattr(pool, "max_ranks_here", lambda: 2)
    assert main(["replay", str(path), "--mode", "inprocess"]) == 125
    assert "this machine runs at most 2" in capsys.readouterr().err
    monkeypatch.setattr(pool, "max_ranks_here", lambda: 256)  # a 64-core GPU host
    assert main(["replay", str(path), "--mode", "inprocess"]) == 0


def test_explore_codes(tmp_path: Path, capsys) -> None:
    base = ["--layout", "1x2", "--replay-dir", str(tmp_path), "--seed", "0"]
    assert main(["explore", "--examples", "3", *base]) == 0
    assert main(["explore", "--variant", "cp_rank_in_key", "--examples", "60", *base]) == 1
    assert list(tmp_path.glob("replay-cp_rank_in_key-*.json"))
    for argv in (["--examples", "0"], ["--examples", "-3"], ["--timeout", "nan"]):
        with pytest.raises(SystemExit) as e:
            main(["explore", *argv, *base])
        assert e.value.code == 2
    assert main(["explore", "--variant", "nope", *base]) == 2
    assert main(["explore", "--layout", "2y2", "--replay-dir", str(tmp_path)]) == 2
    capsys.readouterr()
    assert main(["explore", "--examples", "3", *NO_MASTER, *base]) == 125
    assert "Traceback" not in capsys.readouterr().err


def test_soak_codes(tmp_path: Path, capsys) -> None:
    quick = ["--minutes", "0.02", "--seed", "0"]
    assert main(["soak", *quick, "--out", str(tmp_path / "a")]) == 0
    assert main(["soak", *quick, "--variant", "cp_rank_in_key", "--out", str(tmp_path / "b")]) == 1
    assert main(["soak", *quick, "--variant", "nope", "--out", str(tmp_path / "c")]) == 2
    assert main(["soak", *quick, "--layout", "2y2", "--out", str(tmp_path / "c")]) == 2
    (tmp_path / "file").write_text("")
    assert main(["soak", *quick, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert main(["soak", *quick, *NO_MASTER, "--out", str(tmp_path / "d")]) == 125
    err = capsys.readouterr().err
    assert "unreachable" in err


def test_device_cuda_without_cuda_is_125(tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert main(["run", "write_acks", "--mode", "inprocess", "--device", "cuda",
                 "--replay-dir", str(tmp_path)]) == 125
    assert main(["soak", "--minutes", "0.02", "--device", "cuda", "--out", str(tmp_path)]) == 125
    assert "no usable CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.glob("replay-*"))


# -- --json ----------------------------------------------------------------------------------
def test_json_verdicts(tmp_path: Path, capsys) -> None:
    keys = {"command", "status", "invariant", "message", "diagnosis", "exit_code", "replay"}
    assert main(["run", "write_acks", "--layout", "2x2", "--variant", "tp_only_sync", "--mode",
                 "inprocess", "--replay-dir", str(tmp_path), "--json"]) == 1
    d = _one_json(capsys)
    assert keys <= set(d) and d["status"] == "diverge" and d["exit_code"] == 1
    assert d["invariant"] == "decisions" and d["confirmed_by_replay"] is True
    assert Path(d["replay"]).exists()
    assert main(["replay", d["replay"], "--mode", "inprocess", "--json"]) == 1
    assert _one_json(capsys)["status"] == "diverge"
    assert main(["explore", "--examples", "2", "--layout", "1x2", "--json"]) == 0
    assert _one_json(capsys)["status"] == "agree"
    assert main(["soak", "--minutes", "0.02", "--out", str(tmp_path / "s"), "--json"]) == 0
    d = _one_json(capsys)
    assert d["status"] == "agree" and d["exit_code"] == 0 and d["report"]
    assert main(["run", "write_acks", "--mode", "inprocess", *NO_MASTER, "--json"]) == 125
    d = _one_json(capsys)
    assert d["status"] == "unknown" and d["exit_code"] == 125 and "unreachable" in d["diagnosis"]
    assert main(["replay", str(tmp_path / "missing.json"), "--json"]) == 2
    assert _one_json(capsys)["status"] == "usage"
    # the SGLang SUT's commands too (no env needed: 0.5.21 is refused before any build)
    assert main(["run", "write_acks", "--sut", "sglang==0.5.21", "--json"]) == 125
    d = _one_json(capsys)
    assert d["status"] == "unknown" and "no HiRadixCache" in d["diagnosis"]
    corpus = next((REPO / "scenarios" / "corpus" / "sglang").glob("*.json"))
    assert main(["replay", str(corpus), "--sut", "sglang==9.9", "--json"]) == 2  # no such SUT
    assert _one_json(capsys)["status"] == "usage"


# -- documentation ---------------------------------------------------------------------------
def test_readme_and_help_print_the_contract(capsys) -> None:
    readme = (REPO / "README.md").read_text()
    # the table of the "### Exit codes" section (other tables have numeric first columns too)
    section = re.search(r"^### Exit codes\n(.*?)(?=^#)", readme, re.M | re.S)
    assert section is not None, "README.md has no '### Exit codes' section"
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section.group(1), re.M))
    assert rows == {str(int(c)): m for c, m in TABLE}
    for argv in (["--help"], ["run", "--help"], ["soak", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        for code, _ in TABLE:
            assert re.search(rf"^\s+{int(code)}\s+\w", out, re.M), (argv, code)
    assert "internal error" in cli.__doc__ + " ".join(m for _, m in TABLE)


def test_flaky_divergence_is_unknown_and_keeps_both_verdicts(monkeypatch, tmp_path: Path,
                                                             capsys) -> None:
    """A divergence that does not reproduce on replay is never reported as one."""
    import scenarios.judge.checker as judge
    from scenarios.core.verdict import Verdict

    calls = {"n": 0}
    real = judge.check

    def first_diverges(s, results):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            return Verdict(False, "tree", "planted: rank 0 vs rank 1")
        return real(s, results)

    monkeypatch.setattr(judge, "check", first_diverges)
    assert main(["run", "write_acks", "--mode", "inprocess", "--replay-dir", str(tmp_path),
                 "--json"]) == 125
    d = _one_json(capsys)
    assert d["status"] == "unknown" and "flaky" in d["diagnosis"]
    assert not list(tmp_path.glob("replay-*"))  # nothing presented as a divergence
    saved = json.loads(Path(d["replay"]).read_text())
    assert Path(d["replay"]).name.startswith("unknown-")
    assert saved["confirmation"]["first"]["status"] == "diverge"
    assert saved["confirmation"]["replay"]["status"] == "agree"


def test_replay_file_records_commit_sut_profile_schema(inprocess_executor, tmp_path: Path,
                                                       capsys) -> None:
    from scenarios.store.replay import REPLAY_SCHEMA, read_replay

    s = load_scenario("write_acks").with_(variant="tp_only_sync", layout="2x2")
    path = write_replay(s, check(s, inprocess_executor.run(s)), tmp_path, "inprocess")
    data = json.loads(path.read_text())
    assert data["schema"] == REPLAY_SCHEMA and data["sut"] == "reference"
    assert "profile" in data and set(data["git"]) == {"commit", "dirty"}
    assert re.fullmatch(r"[0-9a-f]{40}", data["git"]["commit"] or "")
    data["from_a_newer_cpcheck"] = {"x": 1}
    path.write_text(json.dumps(data))
    read_replay(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "from_a_newer_cpcheck" in err[0] and "warning" in err[0]


def test_rank_killed_by_the_os_is_unknown_a_frozen_rank_diverges(monkeypatch, tmp_path: Path,
                                                                capsys) -> None:
    """Today both exit 125 because both messages end with "call start() to run again"."""
    from scenarios.runner.torchrun_pool import RankDiedError, RankTimeoutError
    from scenarios.sut.reference_executor import Executor

    def killed(self, s, **kw):  # noqa: ANN001, ANN003, ANN202
        raise RankDiedError("rank 1 killed by SIGKILL; call start() to run again", 1, -9)

    monkeypatch.setattr(Executor, "run", killed)
    assert main(["run", "write_acks", "--mode", "inprocess", "--replay-dir", str(tmp_path),
                 "--json"]) == 125
    d = _one_json(capsys)
    assert d["status"] == "unknown" and "killed by SIGKILL" in d["diagnosis"]
    assert not list(tmp_path.iterdir())  # no replay file for infrastructure

    def frozen(self, s, **kw):  # noqa: ANN001, ANN003, ANN202
        raise RankTimeoutError("rank 0 did not finish; call start() to run again", "job", [0],
                               {0: "in all_reduce"})

    monkeypatch.setattr(Executor, "run", frozen)
    assert main(["run", "write_acks", "--mode", "inprocess", "--replay-dir", str(tmp_path),
                 "--json"]) == 1  # a hang of the system under test, reproduced by the replay
    d = _one_json(capsys)
    assert d["status"] == "diverge" and d["invariant"] == "error"
    assert d["confirmed_by_replay"] is True and Path(d["replay"]).exists()
