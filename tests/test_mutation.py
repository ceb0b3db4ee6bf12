"""The mutation tooling (scenarios/campaigns/mutation.py): cosmic-ray's dump becomes one entry per
mutant, the reviewed equivalence list takes listed survivors out of the score, the table is
generated; and (soak) one real mutant of reference/hashing.py is killed by the kill command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scenarios.campaigns import mutation

SOURCE = ["def f(a, b):", "    return a < b", "x = 1"]


def _item(op: str, line: int, result: dict | None) -> str:
    return json.dumps([{"job_id": "j", "mutations": [{
        "module_path": "reference/m.py", "operator_name": f"core/{op}", "occurrence": 0,
        "start_pos": [line, 4], "end_pos": [line, 5], "operator_args": {},
        "definition_name": "f"}]}, result])


def _dump() -> str:
    return "\n".join([
        _item("ReplaceComparisonOperator_Lt_LtE", 2,
              {"worker_outcome": "normal", "test_outcome": "killed"}),
        _item("ReplaceComparisonOperator_Lt_NotEq", 2,
              {"worker_outcome": "normal", "test_outcome": "survived"}),
        _item("NumberReplacer", 3, {"worker_outcome": "normal", "test_outcome": "survived"}),
        _item("ReplaceComparisonOperator_Lt_Is", 2, {"worker_outcome": "skipped"}),
        _item("AddNot", 2, {"worker_outcome": "exception", "test_outcome": "incompetent"}),
        _item("ReplaceComparisonOperator_Lt_Gt", 2, None),
    ])


def test_entries_score_and_table_from_a_dump(tmp_path: Path) -> None:
    rows = mutation.entries(_dump(), lambda _m: SOURCE, "t")
    assert sorted(r["outcome"] for r in rows) == ["incompetent", "killed", "not run",
                                                   "survived", "survived"]
    assert all(r["operator"] != "ReplaceComparisonOperator_Lt_Is" for r in rows)  # filtered
    eq_file = tmp_path / "eq.toml"
    eq_file.write_text('[[mutant]]\nmodule = "reference/m.py"\noperator = "NumberReplacer"\n'
                       'occurrence = 0\nsource = "x = 1"\nreason = "x is never read"\n')
    equivalent = mutation.load_equivalent(eq_file)
    sc = mutation.score(rows, equivalent)["total"]
    assert sc == {"mutants": 5, "run": 4, "killed": 1, "survived": 1, "equivalent": 1,
                  "incompetent": 1}
    results = {"targets": {"t": {"when": "now", "commit": "abc", "machine": "2 cores",
                                 "limit_s": 60, "detectors": ["hashing"], "rows": rows}}}
    res, doc = tmp_path / "r.json", tmp_path / "score.md"
    res.write_text(json.dumps(results))
    text = mutation.write_report(res, doc, eq_file)
    assert doc.read_text() == text
    assert "| total | 5 | 4 | 1 | 1 | 1 | 1 | 50% |" in text  # 1 killed of 2 judged
    assert "## Surviving mutants (1)" in text and "`return a < b`" in text
    assert "## Equivalent mutants (1)" in text and "x is never read" in text
    assert "Not run (time limit): 1 of 5 mutants." in text


def test_equivalent_entry_without_a_reason_is_refused(tmp_path: Path) -> None:
    eq_file = tmp_path / "eq.toml"
    eq_file.write_text('[[mutant]]\nmodule = "reference/m.py"\noperator = "AddNot"\n'
                       'source = "x = 1"\n')
    with pytest.raises(ValueError, match="reason"):
        mutation.load_equivalent(eq_file)


def test_the_reviewed_equivalence_list_parses() -> None:
    for e in mutation.load_equivalent():
        assert e["module"] in {m for ms in mutation.TARGETS.values() for m in ms}


@pytest.mark.soak
def test_a_real_mutant_of_the_key_hashing_is_killed(tmp_path: Path) -> None:
    """Token ids packed as 8-byte signed integers again (the bug issue 22 found): the kill
    command's first detector fails on the mutated copy; the unmutated copy passes it."""
    repo = Path(mutation.__file__).resolve().parents[2]
    for d in ("reference", "tests", "scenarios"):
        shutil.copytree(repo / d, tmp_path / d)
    for f in ("conftest.py", "pyproject.toml"):
        shutil.copy2(repo / f, tmp_path / f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}  # the copy first
    argv = [sys.executable, *mutation.DETECTORS["hashing"]]
    assert subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    hashing = tmp_path / "reference" / "hashing.py"
    text = hashing.read_text()
    assert 'fmt = f"<{len(token_ids)}I"' in text, "the packing moved: update this plant"
    hashing.write_text(text.replace('fmt = f"<{len(token_ids)}I"', 'fmt = f"<{len(token_ids)}q"'))
    assert subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True).returncode != 0


def test_committed_score_table_is_generated_from_the_committed_results() -> None:
    if not mutation.RESULTS.exists():
        pytest.skip("no mutation run committed yet")
    results = json.loads(mutation.RESULTS.read_text())
    assert mutation.SCORE_DOC.read_text() == mutation.render(results, mutation.load_equivalent())


FAKE_COSMIC_RAY = """#!/bin/sh
# the verb $FAKE_HANG runs a child (as exec runs a mutant's kill command) and waits for it;
# every other verb succeeds at once
if [ "$1" = "$FAKE_HANG" ]; then
  sleep 300 &
  echo "$$ $!" > "$FAKE_PIDS"
  wait
fi
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def _fake_run(tmp_path: Path, hang: str, code: str) -> tuple[subprocess.Popen, list[int], Path]:
    """`code` (a run of target hashing) in a child over a fake cosmic-ray whose verb `hang` runs
    a child and waits; returns once that verb runs: the runner, the tool's and its child's pids,
    the folder that holds the throwaway tree."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cosmic-ray", "cr-filter-operators"):
        (bin_dir / tool).write_text(FAKE_COSMIC_RAY)
        (bin_dir / tool).chmod(0o755)
    pids_file, trees = tmp_path / "pids", tmp_path / "tmp"
    trees.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_PIDS": str(pids_file), "FAKE_HANG": hang, "TMPDIR": str(trees)}
    runner = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=Path(mutation.__file__).resolve().parents[2])
    deadline = time.monotonic() + 120
    while not (pids_file.exists() and len(pids_file.read_text().split()) == 2):
        assert runner.poll() is None, f"the run ended before cosmic-ray {hang} started"
        assert time.monotonic() < deadline, f"cosmic-ray {hang} never started"
        time.sleep(0.1)
    pids = [int(p) for p in pids_file.read_text().split()]
    assert all(_alive(p) for p in pids) and len(list(trees.iterdir())) == 1
    return runner, pids, trees


def _nothing_left(pids: list[int], trees: Path) -> None:
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) or list(trees.iterdir()):
        assert time.monotonic() < deadline, (
            f"left behind: {[p for p in pids if _alive(p)]}, {list(trees.iterdir())}")
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("hang", ["init", "exec"])
def test_a_killed_run_leaves_no_cosmic_ray_process_and_no_tree(tmp_path: Path, hang: str) -> None:
    """SIGKILL of the process running a target, while cosmic-ray sets up or runs mutants: the
    watchdog stops the tool and its children (a mutant's kill command) and removes the
    throwaway tree within seconds."""
    code = "from scenarios.campaigns import mutation; mutation.run_target('hashing', 300)"
    runner, pids, trees = _fake_run(tmp_path, hang, code)
    try:
        runner.kill()
        runner.wait()
        _nothing_left(pids, trees)
    finally:
        runner.kill()
        runner.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_ends_the_time_limit_early_and_keeps_the_entries(tmp_path: Path) -> None:
    """SIGTERM (a CI timeout) while mutants run: the run stops them, dumps what was judged and
    returns it, as at its time limit."""
    code = ("import signal; from scenarios.campaigns import mutation as m\n"
            "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, m._raise_stopped)\n"
            "print('entries', len(m.run_target('hashing', 300)))")
    runner, pids, trees = _fake_run(tmp_path, "exec", code)
    try:
        runner.terminate()
        out, _ = runner.communicate(timeout=60)
        assert runner.returncode == 0 and "entries 0" in out  # the fake's dump is empty
        _nothing_left(pids, trees)
    finally:
        runner.kill()
        runner.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stop_inside_popen_still_stops_the_started_tool_and_keeps_the_entries(
        tmp_path: Path) -> None:
    """A SIGTERM whose handler runs inside Popen, after `cosmic-ray exec` started (seen on a
    loaded CI box: `_raise_stopped` raised from `_execute_child`): the run stops the tool by
    its recorded group and still returns what was judged."""
    code = ("import os, time; from scenarios.campaigns import mutation as m\n"
            "real = m._spawn\n"
            "def spawn(cmd, *a, **k):\n"
            "    p = real(cmd, *a, **k)\n"
            "    if 'exec' in cmd:\n"
            "        while not (os.path.exists(os.environ['FAKE_PIDS']) and\n"
            "                   len(open(os.environ['FAKE_PIDS']).read().split()) == 2):\n"
            "            time.sleep(0.05)\n"
            "        time.sleep(1.0)  # the test has seen the tool and its child alive\n"
            "        raise m.Stopped('SIGTERM')\n"
            "    return p\n"
            "m._spawn = spawn\n"
            "print('entries', len(m.run_target('hashing', 300)))")
    runner, pids, trees = _fake_run(tmp_path, "exec", code)
    try:
        out, _ = runner.communicate(timeout=60)
        assert runner.returncode == 0 and "entries 0" in out
        _nothing_left(pids, trees)
    finally:
        runner.kill()
        runner.communicate()


def _session(path: Path, specs: list[tuple]) -> None:
    """The two tables of cosmic-ray's session database the run writes to (its schema)."""
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE mutation_specs (module_path VARCHAR, operator_name VARCHAR, "
                   "occurrence INTEGER, start_pos_row INTEGER, start_pos_col INTEGER, "
                   "definition_name VARCHAR, job_id VARCHAR NOT NULL PRIMARY KEY)")
        db.execute("CREATE TABLE work_results (worker_outcome VARCHAR(9), output TEXT, "
                   "test_outcome VARCHAR(11), diff TEXT, job_id VARCHAR NOT NULL PRIMARY KEY)")
        db.executemany("INSERT INTO mutation_specs VALUES (?, ?, ?, ?, ?, ?, ?)", specs)


def _results(path: Path) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT job_id, output FROM work_results").fetchall())


def test_resume_keeps_earlier_kills_and_runs_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _session(db, [("reference/m.py", "core/ReplaceComparisonOperator_Lt_LtE", 0, 2, 4, "f", "a"),
                  ("reference/m.py", "core/ReplaceComparisonOperator_Lt_NotEq", 0, 2, 4, "f",
                   "b"),
                  ("reference/m.py", "core/NumberReplacer", 0, 3, 4, None, "c")])
    earlier = mutation.entries(_dump(), lambda _m: SOURCE, "t")
    judged = {mutation._key(e["module"], e["operator"], e["occurrence"], e["line"], e["col"]): e
              for e in earlier if e["outcome"] != "not run"}
    mutation._skip_judged(db, {k: e for k, e in judged.items() if e["outcome"] == "killed"})
    assert _results(db) == {"a": mutation.KILLED_EARLIER}  # the earlier kill is not run again
    dump = "\n".join([
        _item("ReplaceComparisonOperator_Lt_LtE", 2,
              {"worker_outcome": "skipped", "output": mutation.KILLED_EARLIER}),
        _item("ReplaceComparisonOperator_Lt_NotEq", 2,
              {"worker_outcome": "normal", "test_outcome": "killed"}),
        _item("NumberReplacer", 3, None)])
    rows = mutation.entries(dump, lambda _m: SOURCE, "t", judged)
    assert [(r["operator"], r["outcome"]) for r in rows] == [
        ("ReplaceComparisonOperator_Lt_LtE", "killed"),  # kept
        ("ReplaceComparisonOperator_Lt_NotEq", "killed"),  # survived before, killed now
        ("NumberReplacer", "survived")]  # not reached now: its earlier survival still counts


def test_target_functions_leave_the_rest_unrun(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _session(db, [("reference/m.py", "core/AddNot", 0, 2, 4, "writing_check", "in"),
                  ("reference/m.py", "core/AddNot", 1, 3, 4, "evict", "out"),
                  ("reference/m.py", "core/AddNot", 2, 1, 0, None, "module level")])
    mutation._skip_outside(db, ("writing_check",))
    assert set(_results(db)) == {"out", "module level"}
