"""The harness measures its own power: mutation testing of `reference/` with cosmic-ray.

Cross-rank checks see ranks that disagree; a bug that keeps every rank agreeing (a wrong key
encoding, a predicate wrong only at its boundary) escapes them. This mutates the reference's
decision, sync and hashing modules one operator at a time and runs the fast detectors on each
mutant (the kill command: the target's TARGET_DETECTORS of DETECTORS below); a mutant that
every detector passes survived.

    python -m scenarios.campaigns.mutation run --targets hashing --minutes 20
    python -m scenarios.campaigns.mutation report        # the table from the kept results
    python -m scenarios.campaigns.mutation kill --target sync   # a kill command on this tree

Targets run one at a time per process; runs of different targets may go at once (each keeps
its own entry in RESULTS). A watchdog stops cosmic-ray and every mutant's kill command if the
runner dies, SIGKILL included.

`run` mutates a throwaway copy of the tracked tree (never the checkout), keeps each target's
outcomes in RESULTS (JSON, one entry per mutant) and regenerates SCORE_DOC from them and the
reviewed list of equivalent mutants (EQUIVALENT). A time limit stops the run; the table then
says how many mutants were not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scenarios.core.config import CP_LAYOUTS
from scenarios.core.errors import Stopped

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "measurements" / "mutation-results.json"
SCORE_DOC = REPO / "docs" / "measurements" / "mutation-score.md"
EQUIVALENT = REPO / "docs" / "measurements" / "mutation-equivalent.toml"

#: the reference's modules under mutation, by target name
TARGETS: dict[str, tuple[str, ...]] = {
    "hashing": ("reference/hashing.py",),
    "sync": ("reference/sync.py",),
    "decisions": ("reference/hiradix_cache.py", "reference/cache_controller.py"),
}
#: targets mutated only inside these functions (cosmic-ray's definition name). The decision
#: modules hold ~800 mutants, mostly pool and IO plumbing, at 10-40 s each on a shared 2-core
#: box: the run covers the decision points (each agreement and what acts on its value) and the
#: helpers that compute the agreed counts.
TARGET_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "decisions": ("writing_check", "_ack_writes", "loading_check", "_finished_prefix",
                  "drain_storage_control_queues", "can_terminate_prefetch",
                  "check_prefetch_progress", "release_aborted_request"),
}

#: operators left out (regexes over cosmic-ray operator names): bit, power and modulo
#: replacements of arithmetic, identity comparisons, and decorator / exception removal make
#: mutants that cannot run or that no HiCache bug resembles; every `|` in the mutated modules is
#: a type annotation (`X | None`, never evaluated under `from __future__ import annotations`).
#: What stays: comparisons (the boundaries), + - *, numbers, not / and / or, True / False,
#: loops run zero times, break / continue.
EXCLUDED_OPERATORS = (
    r"core/ReplaceBinaryOperator_BitOr_\w+$",
    r"core/ReplaceBinaryOperator_\w+_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|Mod|Div|FloorDiv)$",
    r"core/ReplaceComparisonOperator_\w+_(Is|IsNot|In|NotIn)$",
    r"core/RemoveDecorator",
    r"core/ExceptionReplacer",
    r"core/ReplaceUnaryOperator_\w+_(UAdd|USub|Invert)$",
)

#: seconds one mutant's kill command may take before it counts as killed by timeout
MUTANT_TIMEOUT_S = 300.0


def _py() -> str:
    return sys.executable


#: The detectors, cheapest first; the first that fails kills the mutant. One place: the
#: differential explore (`explore --differential`) is added here as one more entry.
DETECTORS: dict[str, list[str]] = {
    # the reference's keys pinned byte for byte (SGLang's hashing, without any release)
    "hashing": ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "--no-header",
                "tests/test_hashing.py"],
    # the sync groups per release on pipeline layouts and on groups that dedup, which the
    # generated runs below never build (no PP forward, no repeated rank set), and SyncGroup /
    # TorchCollectives over fakes
    "sync": ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "--no-header",
             "tests/test_sync_units.py"],
    # decision points where every rank computes the same wrong value (the ack prefix, the
    # best-effort termination record): no cross-rank check sees those
    "decision-units": ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "--no-header",
                       "tests/test_decision_units.py"],
    # GENERATED_BUDGETS in-process: checker (six invariants) and protocol oracle
    "generated": ["-m", "scenarios.campaigns.mutation", "detect-generated"],
}
#: each target's kill command: the detectors that import its modules (a test that never
#: imports reference/sync.py cannot kill a mutant of it; its run is only cost). The generated
#: runs import the whole reference.
TARGET_DETECTORS: dict[str, tuple[str, ...]] = {
    "hashing": ("hashing", "generated"),
    "sync": ("sync", "generated"),
    "decisions": ("decision-units", "generated"),
}
#: opt-in (`--diff VERSION`): the catalog's `cpcheck diff` on one built release, 40-100 s a
#: scenario on a loaded 2-core box, so the nightly runs it and a local run need not
DIFF_SCENARIOS = ("write_acks", "revoke", "prefetch_batches")


def detectors(target: str | None = None, diff_release: str | None = None
              ) -> dict[str, list[str]]:
    """A target's kill command (every detector without one), in order."""
    names = TARGET_DETECTORS[target] if target else tuple(DETECTORS)
    out = {n: DETECTORS[n] for n in names}
    if diff_release:
        for name in DIFF_SCENARIOS:
            out[f"diff {name}"] = ["-m", "scenarios.cli", "diff", name, "--sut",
                                   f"sglang=={diff_release}"]
    return out


def kill_command(target: str, diff_release: str | None = None) -> str:
    """The shell command cosmic-ray runs per mutant (exit 0: survived, else killed)."""
    args = [_py(), "-m", "scenarios.campaigns.mutation", "kill", "--target", target]
    if diff_release:
        args += ["--diff", diff_release]
    return " ".join(args)


def _in_process(argv: list[str]) -> int | None:
    """Run a pytest or detect-generated detector in this process (one interpreter and one torch
    import per mutant, not one per detector: most of a mutant's cost on a loaded box); None for
    any other detector."""
    if argv[:2] == ["-m", "pytest"]:
        import pytest

        return int(pytest.main(argv[2:]))
    if argv == DETECTORS["generated"]:
        return detect_generated()
    return None


def run_detectors(target: str | None = None, diff_release: str | None = None,
                  verbose: bool = True) -> int:
    """Run the kill command's detectors in order; 1 when one fails (the mutant is killed)."""
    for name, argv in detectors(target, diff_release).items():
        t0 = time.monotonic()
        rc = _in_process(argv)
        if rc is None:
            rc = subprocess.run([_py(), *argv], cwd=os.getcwd(), capture_output=not verbose,
                                timeout=MUTANT_TIMEOUT_S).returncode
        if verbose:
            print(f"detector {name}: exit {rc} in {time.monotonic() - t0:.1f} s", flush=True)
        if rc != 0:
            return 1
    return 0


#: (protocol, layouts, derandomized examples) of the generated detector: the `ci` budget on
#: today's protocol, then smaller ones on paths it never takes: a pipeline (PP in the groups),
#: progress agreed at termination with writing_check's early return (0.5.13), loading_check
#: unsynchronised (0.5.11). Not 0.5.13 on a pipeline (its storage hit count is agreed per
#: stage) nor 0.5.10 with DP attention (its TP group misses the CP peers): real divergences the
#: checker reports on the unmutated reference; tests/test_sync_units.py pins their groups.
GENERATED_BUDGETS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("sglang-0.5.20", CP_LAYOUTS, 60),
    ("sglang-0.5.20", ("1x2x2",), 10),
    ("sglang-0.5.13", ("2x2",), 10),
    ("sglang-0.5.11", ("2x2",), 10),
)


def detect_generated(examples: int | None = None) -> int:
    """GENERATED_BUDGETS of the explore generator, in-process (`examples` replaces each
    count); exit 1 on the first run the checker or the oracle rejects."""
    from hypothesis import HealthCheck, given, settings

    from scenarios.core.schedule import Schedule
    from scenarios.generate.strategies import schedules
    from scenarios.judge.judging import run_checked
    from scenarios.sut.reference_executor import Executor

    bad: list[str] = []
    with Executor("inprocess", timeout_s=10.0) as ex:
        for protocol, layouts, count in GENERATED_BUDGETS:
            cfg = settings(max_examples=examples or count, deadline=None, derandomize=True,
                           database=None, suppress_health_check=list(HealthCheck))

            @cfg
            @given(s=schedules(layouts=layouts, protocol=protocol))
            def run(s: Schedule) -> None:
                if bad:
                    return
                _, v = run_checked(ex, s)
                if not v.ok:
                    bad.append(f"{s.protocol} {s.layout}: {v.summary()[:300]}")

            run()
            if bad:
                print(f"detect-generated: {bad[0]}")
                return 1
    return 0


# -- a run ------------------------------------------------------------------------------------
def _copy_tree(dst: Path) -> None:
    """The tracked files (this checkout's content, uncommitted edits included), plus links to
    the environments (.venv, build/) the detectors need."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = REPO / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    for link in (".venv", "build"):
        if (REPO / link).exists():
            (dst / link).symlink_to((REPO / link).resolve())


def _config(modules: tuple[str, ...], command: str) -> str:
    mods = ", ".join(json.dumps(m) for m in modules)
    ops = ", ".join(json.dumps(o) for o in EXCLUDED_OPERATORS)
    return (f"[cosmic-ray]\nmodule-path = [{mods}]\ntimeout = {MUTANT_TIMEOUT_S}\n"
            f"excluded-modules = []\ntest-command = {json.dumps(command)}\n"
            f"[cosmic-ray.distributor]\nname = \"local\"\n"
            f"[cosmic-ray.filters.operators-filter]\nexclude-operators = [{ops}]\n")


def _cr(name: str) -> str:
    """A cosmic-ray tool: on PATH, else beside this interpreter (the `mutation` extra). It
    mutates files without importing them, so any environment's copy serves."""
    return shutil.which(name) or str(Path(_py()).with_name(name))


def _skip_outside(session: Path, functions: tuple[str, ...]) -> None:
    """Mark every pending mutant outside `functions` skipped, as cosmic-ray's own filters do
    (a `work_results` row with outcome SKIPPED): `exec` leaves it and `entries` drops it."""
    import sqlite3

    marks = ",".join("?" * len(functions))
    with sqlite3.connect(session) as db:
        db.execute(
            "INSERT INTO work_results (worker_outcome, output, test_outcome, diff, job_id) "
            "SELECT 'SKIPPED', 'outside the target functions', NULL, NULL, s.job_id "
            "FROM mutation_specs s WHERE s.job_id NOT IN (SELECT job_id FROM work_results) "
            f"AND (s.definition_name IS NULL OR s.definition_name NOT IN ({marks}))",
            functions)


def _key(module: str, operator: str, occurrence: int, line: int, col: int) -> tuple:
    return (module, operator.removeprefix("core/"), int(occurrence), int(line), int(col))


KILLED_EARLIER = "killed in an earlier session"


def _skip_judged(session: Path, judged: dict[tuple, dict]) -> None:
    """Mark the mutants an earlier session killed skipped (`--resume`): `exec` leaves them."""
    import sqlite3

    with sqlite3.connect(session) as db:
        specs = db.execute(
            "SELECT job_id, module_path, operator_name, occurrence, start_pos_row, start_pos_col "
            "FROM mutation_specs WHERE job_id NOT IN (SELECT job_id FROM work_results)").fetchall()
        db.executemany(
            "INSERT INTO work_results (worker_outcome, output, test_outcome, diff, job_id) "
            "VALUES ('SKIPPED', ?, NULL, NULL, ?)",
            [(KILLED_EARLIER, job) for job, *spec in specs if _key(*spec) in judged])


_STOPPED: list[str] = []


def _raise_stopped(signum: int, _frame: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # once: the dump and the write still run
        signal.signal(sig, signal.SIG_IGN)
    _STOPPED.append(signal.Signals(signum).name)
    raise Stopped(_STOPPED[0])


def _stop_recorded(tree: Path) -> None:
    """Stop every tool group recorded in `tree` that is still there (none, after a normal
    run): an exception (Stopped during set-up, say) must not leave them."""
    try:
        pgids = [int(x) for x in (tree / PGIDS).read_text().split()]
    except OSError:
        return
    for pgid in pgids:
        _stop_group(pgid, grace_s=3.0)


def _stop_group(pgid: int, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.2)
            os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


#: where each cosmic-ray tool records its process group, in the throwaway tree
PGIDS = ".pgids"
#: the watchdog: argv = our pid, the throwaway tree, PGIDS. It runs in a session of its own, so a
#: SIGKILL of us leaves it running; once we are gone (it is reparented) it stops the process
#: group of every cosmic-ray tool we started (PGIDS in the tree: each runs in its own session,
#: a mutant's kill command in the tool's) and removes the tree.
_WATCHDOG = """
import os, shutil, signal, sys, time
parent, tree = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, signal.SIG_DFL)
while os.getppid() == parent:
    time.sleep(0.2)
time.sleep(0.5)  # a tool forked just before our parent died records itself
try:
    with open(os.path.join(tree, sys.argv[3])) as f:
        pgids = [int(x) for x in f.read().split()]
except OSError:
    pgids = []
for sig in (signal.SIGTERM, signal.SIGKILL):
    left = 0
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
            left += 1
        except ProcessLookupError:
            pass
    if not left:
        break
    time.sleep(3)
shutil.rmtree(tree, ignore_errors=True)
"""


def _watch(tree: Path) -> subprocess.Popen:
    """Stop every cosmic-ray tool started in `tree` (every mutant's kill command with it) and
    remove the tree if this process dies without doing it (SIGKILL, OOM killer)."""
    return subprocess.Popen([_py(), "-c", _WATCHDOG, str(os.getpid()), str(tree), PGIDS],
                            start_new_session=True, stdin=subprocess.DEVNULL)


def _spawn(cmd: list[str], root: Path, env: dict[str, str], **kw: Any) -> subprocess.Popen:
    """A cosmic-ray tool in a process group of its own, recorded for the watchdog by the child
    itself before it runs the tool (recorded after Popen returns, a SIGKILL in between would
    leave it unrecorded)."""
    pgids = str(root / PGIDS)

    def record() -> None:
        fd = os.open(pgids, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)

    return subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True,
                            preexec_fn=record, **kw)  # noqa: PLW1509 (no threads here)


def _tool(cmd: list[str], root: Path, env: dict[str, str]) -> str:
    """Run a short cosmic-ray tool to its end; its stdout."""
    proc = _spawn(cmd, root, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
    return out


def run_target(target: str, seconds: float, diff_release: str | None = None,
               earlier: list[dict] | None = None) -> list[dict]:
    """Mutate one target in a throwaway copy for at most `seconds`; every mutant's entry
    (those not reached have outcome `not run`). `earlier` (`--resume`): the target's entries
    from an earlier session; those it killed keep their entry and are not run again (sound
    while the detectors only grow), the rest (survived, not run) run."""
    modules = TARGETS[target]
    lines = {m: (REPO / m).read_text().splitlines() for m in modules}
    same = {_key(e["module"], e["operator"], e["occurrence"], e["line"], e["col"]): e
            for e in earlier or [] if e["outcome"] != "not run" and e["module"] in lines
            and e["line"] <= len(lines[e["module"]])
            and lines[e["module"]][e["line"] - 1].strip() == e["source"]}
    judged = {k: e for k, e in same.items() if e["outcome"] == "killed"}
    with tempfile.TemporaryDirectory(prefix="cpcheck-mutation-") as tmp:
        root = Path(tmp)
        watchdog = _watch(root)
        try:
            _copy_tree(root)
            (root / "cr.toml").write_text(_config(modules, kill_command(target, diff_release)))
            env = {**os.environ, "PYTHONPATH": str(root)}
            _tool([_cr("cosmic-ray"), "init", "cr.toml", "session.sqlite"], root, env)
            _tool([_cr("cr-filter-operators"), "session.sqlite", "cr.toml"], root, env)
            if target in TARGET_FUNCTIONS:
                _skip_outside(root / "session.sqlite", TARGET_FUNCTIONS[target])
            if judged:
                _skip_judged(root / "session.sqlite", judged)
            proc = None
            try:  # a stop may land inside Popen itself, after the tool started
                proc = _spawn([_cr("cosmic-ray"), "exec", "cr.toml", "session.sqlite"], root,
                              env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                proc.wait(timeout=max(seconds, 1))
            except (subprocess.TimeoutExpired, Stopped):
                if proc is not None:
                    _stop_group(proc.pid)
                    proc.wait()
                else:  # the tool recorded its group before it ran (_spawn)
                    _stop_recorded(root)
            dump = _tool([_cr("cosmic-ray"), "dump", "session.sqlite"], root, env)
        finally:
            _stop_recorded(root)
            watchdog.kill()
            watchdog.wait()
        return entries(dump, lines.__getitem__, target, same)


def entries(dump: str, source_lines, target: str,  # noqa: ANN001
            judged: dict[tuple, dict] | None = None) -> list[dict]:
    """One compact entry per mutant from `cosmic-ray dump` output (JSON lines of
    [work_item, result]); operator-filtered mutants are left out. `judged` (`--resume`): an
    earlier session's entries (source line unchanged): those it killed keep their entry, and
    one this session did not reach keeps its earlier outcome (a survivor stays counted)."""
    out: list[dict] = []
    cache: dict[str, list[str]] = {}
    for line in dump.splitlines():
        if not line.strip():
            continue
        item, result = json.loads(line)
        m = item["mutations"][0]
        lines = cache.setdefault(m["module_path"], source_lines(m["module_path"]))
        row = m["start_pos"][0]
        source = lines[row - 1].strip() if row <= len(lines) else ""
        if result and result.get("output") == KILLED_EARLIER:
            out.append((judged or {})[_key(m["module_path"], m["operator_name"],
                                           m["occurrence"], *m["start_pos"])])
            continue
        if (result and result.get("worker_outcome") == "skipped") or any(
                re.match(x, m["operator_name"]) for x in EXCLUDED_OPERATORS):
            continue
        key = _key(m["module_path"], m["operator_name"], m["occurrence"], *m["start_pos"])
        if result is None and key in (judged or {}):
            out.append((judged or {})[key])
            continue
        if result is None:
            outcome = "not run"
        elif result.get("worker_outcome") != "normal":
            outcome = "incompetent"
        else:  # a kill command past MUTANT_TIMEOUT_S is "killed" (cosmic-ray: a hang caught)
            outcome = {"killed": "killed", "survived": "survived"}.get(
                result.get("test_outcome"), "incompetent")
        out.append({"target": target, "module": m["module_path"], "line": row,
                    "col": m["start_pos"][1], "function": m.get("definition_name") or "",
                    "operator": m["operator_name"].removeprefix("core/"),
                    "occurrence": m["occurrence"], "source": source, "outcome": outcome})
    out.sort(key=lambda e: (e["module"], e["line"], e["col"], e["operator"]))
    return out


# -- results, equivalence and the table --------------------------------------------------------
def load_equivalent(path: Path = EQUIVALENT) -> list[dict]:
    """The reviewed list: each entry names module, operator, the source line and why the
    mutant cannot change behaviour."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    if not path.exists():
        return []
    data = tomllib.loads(path.read_text())
    out = data.get("mutant", [])
    for e in out:
        for key in ("module", "operator", "source", "reason"):
            if not str(e.get(key, "")).strip():
                raise ValueError(f"{path.name}: an equivalent mutant without {key!r}: {e}")
    return out


def is_equivalent(entry: dict, equivalent: list[dict]) -> str | None:
    for e in equivalent:
        if (e["module"] == entry["module"] and e["operator"] == entry["operator"]
                and e["source"].strip() == entry["source"]
                and int(e.get("occurrence", entry["occurrence"])) == entry["occurrence"]):
            return e["reason"]
    return None


def score(rows: list[dict], equivalent: list[dict]) -> dict[str, dict[str, int]]:
    """Per module and in total: mutants, run, killed, survived, equivalent, incompetent."""
    table: dict[str, dict[str, int]] = {}
    for r in rows:
        for key in (r["module"], "total"):
            t = table.setdefault(key, dict.fromkeys(
                ("mutants", "run", "killed", "survived", "equivalent", "incompetent"), 0))
            t["mutants"] += 1
            if r["outcome"] == "not run":
                continue
            t["run"] += 1
            if r["outcome"] == "survived" and is_equivalent(r, equivalent):
                t["equivalent"] += 1
            else:
                t[r["outcome"]] += 1
    return table


def _excluded(operator: str) -> bool:
    return any(re.match(x, f"core/{operator}") for x in EXCLUDED_OPERATORS)


def render(results: dict, equivalent: list[dict]) -> str:
    """The score page; rows of operators excluded since the run are left out."""
    rows = [r for t in results["targets"].values() for r in t["rows"]
            if not _excluded(r["operator"])]
    sc = score(rows, equivalent)
    out = ["# Mutation score of the fast detectors", "",
           "Generated by `python -m scenarios.campaigns.mutation report` from",
           "`docs/measurements/mutation-results.json` (written by `... mutation run`) and the",
           "reviewed list of equivalent mutants `docs/measurements/mutation-equivalent.toml`.",
           "Never edit this file by hand.", "",
           "Score = killed / (run - equivalent - incompetent): a surviving mutant that is not",
           "listed as equivalent counts against it. Tool: cosmic-ray; operators:",
           "`EXCLUDED_OPERATORS` in `scenarios/campaigns/mutation.py` says which are left out.",
           "", "| target | when | commit | machine | time limit | kill command |",
           "|---|---|---|---|---|---|"]
    for name, t in sorted(results["targets"].items()):
        sessions = f" in {t['sessions']} sessions" if t.get("sessions", 1) > 1 else ""
        out.append(f"| {name} | {t['when']} | {t['commit']} | {t['machine']} | "
                   f"{t['limit_s']:.0f} s{sessions} | {', '.join(t['detectors'])} |")
    for name, t in sorted(results["targets"].items()):
        if t.get("functions"):
            out += ["", f"Target {name} is mutated inside these functions only: "
                        f"{', '.join(f'`{f}`' for f in t['functions'])}."]
    out += ["", "| module | mutants | run | killed | survived | equivalent | incompetent | "
                "score |", "|---|---|---|---|---|---|---|---|"]
    for mod, t in sorted(sc.items(), key=lambda kv: (kv[0] == "total", kv[0])):
        judged = t["run"] - t["equivalent"] - t["incompetent"]
        pct = f"{100 * t['killed'] / judged:.0f}%" if judged else "-"
        out.append(f"| {mod} | {t['mutants']} | {t['run']} | {t['killed']} | {t['survived']} | "
                   f"{t['equivalent']} | {t['incompetent']} | {pct} |")
    surv = [r for r in rows if r["outcome"] == "survived" and not is_equivalent(r, equivalent)]
    out += ["", f"## Surviving mutants ({len(surv)})", ""]
    if surv:
        out += ["| module:line | function | operator | source line |", "|---|---|---|---|"]
        out += [f"| {r['module']}:{r['line']} | {r['function']} | {r['operator']} | "
                f"`{r['source'].replace('|', '/')}` |" for r in surv]
    eq = [(r, is_equivalent(r, equivalent)) for r in rows if r["outcome"] == "survived"]
    eq = [(r, why) for r, why in eq if why]
    out += ["", f"## Equivalent mutants ({len(eq)})", ""]
    if eq:
        out += ["| module:line | operator | source line | why it cannot change behaviour |",
                "|---|---|---|---|"]
        out += [f"| {r['module']}:{r['line']} | {r['operator']} | "
                f"`{r['source'].replace('|', '/')}` | {why} |" for r, why in eq]
    not_run = sum(r["outcome"] == "not run" for r in rows)
    out += ["", f"Not run (time limit): {not_run} of {len(rows)} mutants.", ""]
    return "\n".join(out)


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                       text=True)
    return r.stdout.strip() or "unknown"


def _load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"targets": {}}


def write_report(results_path: Path = RESULTS, doc: Path = SCORE_DOC,
                 equivalent_path: Path = EQUIVALENT) -> str:
    results = json.loads(results_path.read_text())
    text = render(results, load_equivalent(equivalent_path))
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scenarios.campaigns.mutation",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="mutate targets, keep results, regenerate the table")
    r.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma list of {', '.join(TARGETS)}")
    r.add_argument("--minutes", type=float, default=60.0, help="time limit per target")
    r.add_argument("--resume", action="store_true",
                   help="keep the mutants the kept results of a target killed, run the rest "
                        "(several short sessions; only while the detectors only grew)")
    r.add_argument("--diff", default=None, metavar="VERSION",
                   help="add the catalog's `cpcheck diff` on this built release to the kill "
                        "command")
    sub.add_parser("report", help="regenerate the table from the kept results")
    k = sub.add_parser("kill", help="the kill command: a target's detectors on this tree")
    k.add_argument("--target", choices=list(TARGETS), default=None,
                   help="that target's detectors (TARGET_DETECTORS); default every detector")
    k.add_argument("--diff", default=None, metavar="VERSION")
    g = sub.add_parser("detect-generated", help="the `ci` generator budget in-process")
    g.add_argument("--examples", type=int, default=None)
    args = p.parse_args(argv)
    if args.cmd == "kill":
        return run_detectors(args.target, args.diff)
    if args.cmd == "detect-generated":
        return detect_generated(args.examples)
    if args.cmd == "report":
        print(write_report())
        return 0
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or args.minutes <= 0:
        print(f"mutation: unknown target(s) {unknown} or a time limit <= 0 "
              f"(targets: {', '.join(TARGETS)})", file=sys.stderr)
        return 2
    commit = _commit()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a CI timeout or ^C ends the time limit early
        signal.signal(sig, _raise_stopped)
    for t in targets:
        t0 = time.monotonic()
        before = (_load_results()["targets"].get(t) or {}) if args.resume else {}
        try:
            rows = run_target(t, args.minutes * 60, args.diff, before.get("rows"))
        except Stopped as e:
            print(f"mutation: {t}: stopped by {e} before any mutant was judged", file=sys.stderr)
            return 1
        # read now, not at the start: runs of other targets may have finished meanwhile
        results = _load_results()
        results["targets"][t] = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": f"{os.cpu_count()} cores",
            "limit_s": (round(time.monotonic() - t0) if _STOPPED else args.minutes * 60)
            + before.get("limit_s", 0),
            "sessions": before.get("sessions", 1) + 1 if before else 1,
            "seconds": round(time.monotonic() - t0), "detectors": list(detectors(t, args.diff)),
            "functions": list(TARGET_FUNCTIONS.get(t, ())), "rows": rows}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"mutation: {t}: {sum(r['outcome'] == 'killed' for r in rows)} killed, "
              f"{sum(r['outcome'] == 'survived' for r in rows)} survived, "
              f"{sum(r['outcome'] == 'not run' for r in rows)} not run", flush=True)
        if _STOPPED:
            print(f"mutation: stopped by {_STOPPED[0]}: {t} kept, the other targets not run",
                  file=sys.stderr)
            break
    print(write_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
