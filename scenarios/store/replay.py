"""Replay files: a failing Schedule plus everything needed to rerun it and judge it.

A replay file records the Schedule, the mode, the verdict, the git commit it was found at
(and whether the tree was dirty), the system under test and its profile, and a schema version.
Readers accept top-level fields they do not know (one warning line) so older code can still
replay newer files; a newer schema, or a variant / profile / SUT this commit does not know, is
`CannotJudge` (exit 125: `git bisect run` skips the commit), never a bad-input exit 2.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scenarios import __version__
from scenarios.core.config import REPO_ROOT
from scenarios.core.errors import CannotJudge
from scenarios.core.schedule import (
    NAMED_AT_SOME_COMMITS,
    NotAtThisCommit,
    Schedule,
    ScheduleError,
)
from scenarios.core.suts import sglang_version
from scenarios.core.verdict import Verdict
from scenarios.store.report import atomic_write_text

#: 1: schedule, mode, verdict, versions, written; 2: + schema, git, sut, profile
REPLAY_SCHEMA = 2
KNOWN_FIELDS = frozenset({"kind", "schema", "schedule", "mode", "verdict", "versions", "written",
                          "git", "sut", "profile", "confirmation",
                          # corpus annotations: who found it, and its verdict per release
                          "found_by", "expect_by_release", "expect_invariants_by_release"})
REPO = REPO_ROOT


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the code that runs."""
    def git(*argv: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(status.strip()) if status is not None else None}


def replay_name(s: Schedule, verdict: Verdict) -> str:
    """`replay-...` only for a divergence; anything else says what it is (`unknown-...`)."""
    prefix = "replay" if verdict.status == "diverge" else verdict.status or "unknown"
    version = sglang_version(s.sut)
    if version is not None:  # which release, and in which CP configuration
        dp = "dpattn" if s.dp_attention else "nodp"
        return f"{prefix}-sglang-{version}-{dp}-{s.layout}-{s.digest()}.json"
    return f"{prefix}-{s.variant}-{s.layout}-{s.digest()}.json"


def write_replay(s: Schedule, verdict: Verdict, out_dir: str | Path, mode: str,
                 confirmation: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / replay_name(s, verdict)
    data: dict[str, Any] = {
        "kind": "cpcheck-replay",
        "schema": REPLAY_SCHEMA,
        "schedule": json.loads(s.model_dump_json()),
        "mode": mode,
        "verdict": verdict.to_dict(),
        "git": git_state(),
        "sut": getattr(s, "sut", "reference"),
        "profile": getattr(s, "protocol", None),
        "versions": {"cpcheck": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if confirmation is not None:
        data["confirmation"] = confirmation
    atomic_write_text(path, json.dumps(data, indent=1, default=str))
    return path


def read_replay(path: str | Path) -> tuple[Schedule, dict]:
    """(Schedule, the file's data); ScheduleError (exit 2) or CannotJudge (exit 125)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ScheduleError(f"{p}: no such replay file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(f"{p}: cannot read ({type(e).__name__})") from None
    if not text.strip():
        raise ScheduleError(f"{p}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "schedule" not in data:
        raise ScheduleError(f"{p}: not a cpcheck replay file (no 'schedule')")
    schema = data.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise ScheduleError(f"{p}: field 'schema': want a positive integer, got {schema!r}")
    if schema > REPLAY_SCHEMA:
        raise CannotJudge(f"{p}: replay schema {schema} is newer than this commit reads "
                          f"({REPLAY_SCHEMA})")
    unknown = sorted(set(data) - KNOWN_FIELDS)
    if unknown:
        print(f"cpcheck: warning: {p}: ignoring unknown field(s) "
              f"{', '.join(repr(k) for k in unknown)}", file=sys.stderr)
    try:
        s = Schedule.from_dict(data["schedule"], str(p))
    except ScheduleError as e:
        if (isinstance(e.cause, NotAtThisCommit) or e.kind == "extra_forbidden"
                or (e.loc and e.loc[0] in NAMED_AT_SOME_COMMITS)):
            # a name or field from another commit: this one cannot judge it
            raise CannotJudge(str(e)) from None
        raise
    return s, data
