"""Replay files: the corpus reproduces its recorded verdicts; `cpcheck replay` is bisect-ready."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scenarios.cli.main import main
from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check
from scenarios.store.replay import read_replay, write_replay

CORPUS = sorted((Path(__file__).parent.parent / "scenarios" / "corpus").glob("*.json"))


def test_corpus_is_not_empty() -> None:
    assert len(CORPUS) >= 7


def test_every_corpus_file_reads_without_a_warning(capsys: pytest.CaptureFixture) -> None:
    """A field the reader does not know is ignored with a warning on every read: a corpus file
    must use only known fields (a typo would silently drop what it says)."""
    every = CORPUS + sorted((CORPUS[0].parent / "sglang").glob("*.json"))
    for path in every:
        read_replay(path)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_reproduces_recorded_verdict(inprocess_executor, path: Path) -> None:
    s, data = read_replay(path)
    verdict = check(s, inprocess_executor.run(s))
    assert verdict.ok == data["verdict"]["ok"], verdict.summary()
    assert verdict.invariant == data["verdict"]["invariant"]


@pytest.mark.cp
@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_reproduces_under_torchrun(torchrun_executor, path: Path) -> None:
    s, data = read_replay(path)
    verdict = check(s, torchrun_executor.run(s))
    assert verdict.invariant == data["verdict"]["invariant"], verdict.summary()


def test_replay_of_failing_variant_fails_the_same_way_every_time(inprocess_executor,
                                                                  tmp_path: Path, capsys) -> None:
    s = load_scenario("write_acks").with_(variant="tp_only_sync", layout="2x2")
    v = check(s, inprocess_executor.run(s))
    path = write_replay(s, v, tmp_path, "inprocess")
    outputs = []
    for _ in range(3):
        assert main(["replay", str(path), "--mode", "inprocess"]) == 1
        outputs.append(next(ln for ln in capsys.readouterr().out.splitlines()
                            if ln.startswith("DIVERGE")))
    assert len(set(outputs)) == 1 and outputs[0] == v.summary()


def test_replay_exit_codes(tmp_path: Path, capsys, monkeypatch) -> None:
    import scenarios.runner.torchrun_pool as pool

    s = load_scenario("write_acks")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"schedule": json.loads(s.model_dump_json())}))
    assert main(["replay", str(good), "--mode", "inprocess"]) == 0
    # too big for this host, by the host's own limit (a 64-core host runs 8x8)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"schedule": json.loads(s.with_(layout="2x4").model_dump_json())}))
    monkeypatch.setattr(pool, "max_ranks_here", lambda: 4)
    assert main(["replay", str(big), "--mode", "torchrun"]) == 125  # 8 processes: refused
    cap = capsys.readouterr()  # refused up front, or by the pool before it starts a process
    assert "cannot judge here" in cap.err or "more than this machine can run" in cap.out
    assert main(["replay", str(tmp_path / "missing.json")]) == 2


@pytest.mark.parametrize(("text", "needle"), [
    ('layout = "2y2"\n', "unknown layout '2y2'"),
    ('variant = "nope"\n', "unknown variant 'nope'"),
    ('name = "x"\nbogus = 1\n', ":2: field 'bogus'"),
    ('name = "x"\n[cache]\npage_size = 0\n', ":3: field 'cache.page_size'"),
    ("name = \n", "Invalid value"),
])
def test_bad_scenario_files_get_one_line(tmp_path: Path, capsys, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["run", str(path), "--mode", "inprocess"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
