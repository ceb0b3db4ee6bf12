"""SGLang's own rank-consensus checker beside cpcheck's (scenarios/sut/sglang/consensus.py).

Fast: the fire seam (the checker's CRITICAL line and `os._exit(1)` from its thread are recorded,
not obeyed) on a stand-in module that fires the way SGLang's does, and the comparison over a
run's results (first divergent decision, delay in decisions and seconds). The real checker on a
real release runs in `benchmarks/consensus_checker.py`.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
from types import SimpleNamespace

import pytest

from scenarios.sut.sglang import consensus


def _stand_in(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module with the checker's fire path: CRITICAL with the events, then os._exit(1)."""
    import os

    mod = types.ModuleType(consensus.MODULE)
    mod.os = os
    mod.logger = logging.getLogger("test-consensus-stand-in")

    def check(events: list[str]) -> None:
        mod.logger.critical(f"Found rank divergence for {len(events)} events(s)! events = "
                            f"{events}")
        mod.os._exit(1)
    mod.check = check
    monkeypatch.setitem(sys.modules, consensus.MODULE, mod)
    monkeypatch.setenv(consensus.ENV, "1")
    return mod


def test_fire_is_recorded_not_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _stand_in(monkeypatch)
    assert consensus.load() is mod
    assert consensus.load() is mod  # idempotent: one seam, one handler
    assert len(mod.logger.handlers) == 1
    count = [3]
    consensus._WATCH[0] = consensus._Watch(lambda: count[0])
    # the thread ends with SystemExit, which threading ignores (pytest's hook would not)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    t = threading.Thread(target=mod.check, args=(["evict called params=1"],))
    t.start()
    t.join(5)  # the process is still here: only the checker's thread ended
    assert not t.is_alive()
    w = consensus._WATCH[0]
    assert w.fired_at is not None and w.decisions_at_fire == 3
    assert "Found rank divergence" in w.message and "evict called" in w.message
    assert mod.os.getpid() > 0  # the rest of os is the real one
    consensus._WATCH[0] = None


def test_off_without_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(monkeypatch)
    monkeypatch.delenv(consensus.ENV)
    assert consensus.load() is None


def _rank(rank: int, decisions: list, digests: list, said: dict | None) -> SimpleNamespace:
    return SimpleNamespace(rank=rank, decisions={"scheduler": decisions}, digests=digests,
                           consensus_checker=said)


def _said(fired_s: float | None, at: int | None, decided: list[float]) -> dict:
    return {"configured": True, "fired": fired_s is not None, "fired_s": fired_s,
            "decisions_at_fire": at, "message": "Found rank divergence" if fired_s else "",
            "events": 12, "stuck_at_end": False, "decided_s": decided}


def test_compare_measures_from_the_first_divergent_decision() -> None:
    same = [["drain", "", [0], [0], ""]] * 2
    a = _rank(0, [*same, ["drain", "", [4], [4], "x"], ["w", "", [], [], ""]], list("abcd"),
              _said(0.9, 4, [0.1, 0.2, 0.5, 0.6]))
    b = _rank(1, [*same, ["drain", "", [0], [0], "y"], ["w", "", [], [], ""]], list("abcd"),
              _said(None, None, [0.1, 0.2, 0.5, 0.6]))
    c = consensus.compare([a, b])
    assert c["first_divergent_decision"] == 2 and c["fired_ranks"] == [0]
    assert c["after_decisions"] == 1 and c["after_s"] == pytest.approx(0.4)
    assert "fired on ranks [0] 1 decisions / 0.400 s after" in consensus.line(c)
    # a tree digest that differs first counts as the first divergent decision
    b.digests = list("abXd")
    b.decisions["scheduler"][2] = a.decisions["scheduler"][2]
    assert consensus.first_divergent_decision([a, b]) == 2
    b.digests = list("abcd")
    assert consensus.first_divergent_decision([a, b]) is None
    # silent checker, agreeing ranks
    a.consensus_checker = _said(None, None, [])
    c = consensus.compare([a, b])
    assert c["fired_ranks"] == [] and c["after_s"] is None
    assert consensus.line(c).startswith("did not fire (12-12 events")
    assert consensus.compare([_rank(0, [], [], None), _rank(1, [], [], None)]) is None


def test_the_doc_table_is_its_raw_rows_rendered() -> None:
    """docs/measurements/consensus-checker.md is benchmarks/consensus_checker.py's JSON,
    rendered (never edited by hand)."""
    import json

    from benchmarks import consensus_checker as bench
    from scenarios.core.config import REPO_ROOT
    from scenarios.store.doc_tables import read_block

    doc = REPO_ROOT / "docs" / "measurements" / "consensus-checker.md"
    data = json.loads(doc.with_suffix(".json").read_text())
    assert read_block(doc.read_text(), bench.TABLE) == bench.render(data), \
        f"regenerate: {bench.COMMAND} --from-json {doc.with_suffix('.json')}"
    assert data["corpus"] or data["generated"]


# -- the real checker on a real release -------------------------------------------------------
PLANTED_PUT = "    _q.put(msg_fmt % args)\n"


@pytest.mark.soak
@pytest.mark.sglang
@pytest.mark.timeout(1800)
def test_real_checker_fires_through_the_seam(tmp_path) -> None:  # noqa: ANN001
    """0.5.20 with one plant in the checker's input (each rank appends its rank to every
    event): SGLang's own checker must fire on both ranks, say so, and the run goes on (the
    cache is right, so cpcheck agrees). Slow: the tree's first job JIT-compiles 0.5.20's C++ page
    hashing: 4.5 minutes in all on the loaded 2-core box (one try ran out at 6 minutes)."""
    import shutil

    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.judging import run_checked
    from scenarios.sut.sglang import envs
    from scenarios.sut.sglang.executor import SglangExecutor
    from tests.sglang_envs import need

    need("0.5.20")
    root = tmp_path / "python"
    shutil.copytree(envs.release_dir("0.5.20") / "sglang", root / "sglang",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # a checkout's python/ says its release: the tree runs on 0.5.20's dependencies
    (root / "pyproject.toml").write_text('[project]\nname = "sglang"\nversion = "0.5.20"\n')
    f = root / "sglang" / "srt" / "utils" / "rank_consensus_checker.py"
    text = f.read_text()
    assert text.count(PLANTED_PUT) == 1
    f.write_text(text.replace(PLANTED_PUT, "    _q.put(msg_fmt % args + f' rank={dist.get_rank()}')\n"))
    s = load_scenario("write_acks").with_(layout="1x2", sut=f"sglang@{root}")
    # a fresh 0.5.20 tree JIT-compiles SGLang's page-hash extension in its first job (minutes
    # on a loaded box): the warm-up's limit is 12 x timeout_s + 120 s
    with SglangExecutor(tree=str(root), build=False, consensus_checker=True,
                        timeout_s=90) as ex:
        _, v = run_checked(ex, s)
    assert v.status == "agree", v.summary()
    said = v.stats["consensus_checker"]
    assert said["configured"] and min(said["events"].values()) > 0
    assert said["fired_ranks"] == [0, 1], said
    assert "Found rank divergence" in said["message"] and "rank=" in said["message"]
    assert said["after_decisions"] is None  # nothing diverged in the cache itself
