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
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scenarios import __version__
from scenarios.core.errors import CannotJudge
from scenarios.core.schedule import (
    NAMED_AT_SOME_COMMITS,
    NotAtThisCommit,
    Schedule,
    ScheduleError,
    read_json,
)
from scenarios.core.suts import sglang_tree, sglang_version
from scenarios.core.verdict import Verdict
from scenarios.store.provenance import git_state
from scenarios.store.report import atomic_write_text

#: 1: schedule, mode, verdict, versions, written; 2: + schema, git, sut, profile (and
#: sut_tree, optional: an SGLang source tree's path, commit and dirtiness)
REPLAY_SCHEMA = 2
KNOWN_FIELDS = frozenset({"kind", "schema", "schedule", "mode", "verdict", "versions", "written",
                          "git", "sut", "sut_tree", "profile", "confirmation",
                          # differential mode: {"release": V, "protocol": P} (`cpcheck diff`)
                          "differential",
                          # corpus annotations: who found it, its verdict per release, and a
                          # person's note on what it is (what was wrong, where it was fixed)
                          "found_by", "expect_by_release", "expect_invariants_by_release",
                          "note"})


def replay_name(s: Schedule, verdict: Verdict) -> str:
    """`replay-...` only for a divergence; anything else says what it is (`unknown-...`)."""
    prefix = "replay" if verdict.status == "diverge" else verdict.status or "unknown"
    if sglang_tree(s.sut) is not None:  # a source tree: named by its git commit
        tree = verdict.stats.get("sglang_tree") or {}
        at = (tree.get("commit") or "nogit")[:12] + ("-dirty" if tree.get("dirty") else "")
        dp = "dpattn" if s.dp_attention else "nodp"
        return f"{prefix}-sglang-tree-{at}-{dp}-{s.layout}-{s.digest()}.json"
    version = sglang_version(s.sut)
    if "differential" in verdict.stats:  # the reference against a release: `cpcheck diff`
        prefix += "-diff"
    if version is not None:  # which release, and in which CP configuration
        dp = "dpattn" if s.dp_attention else "nodp"
        return f"{prefix}-sglang-{version}-{dp}-{s.layout}-{s.digest()}.json"
    return f"{prefix}-{s.variant}-{s.layout}-{s.digest()}.json"


def replay_data(s: Schedule, verdict: Verdict, mode: str,
                confirmation: dict | None = None) -> dict[str, Any]:
    """What a replay file holds (printed before it is written: a full disk loses nothing)."""
    data: dict[str, Any] = {
        "kind": "cpcheck-replay",
        "schema": REPLAY_SCHEMA,
        "schedule": json.loads(s.model_dump_json()),
        "mode": mode,
        "verdict": verdict.to_dict(),
        "git": git_state(),
        "sut": getattr(s, "sut", "reference"),
        # a source tree (sglang@PATH): its absolute path, git commit and dirtiness
        **({"sut_tree": verdict.stats["sglang_tree"]} if "sglang_tree" in verdict.stats else {}),
        "profile": getattr(s, "protocol", None),
        "versions": {"cpcheck": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if confirmation is not None:
        data["confirmation"] = confirmation
    if "differential" in verdict.stats:
        data["differential"] = verdict.stats["differential"]
    return data


def write_replay(s: Schedule, verdict: Verdict, out_dir: str | Path, mode: str,
                 confirmation: dict | None = None, data: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / replay_name(s, verdict)
    if data is None:
        data = replay_data(s, verdict, mode, confirmation)
    atomic_write_text(path, json.dumps(data, indent=1, default=str))
    return path


def read_replay(path: str | Path) -> tuple[Schedule, dict]:
    """(Schedule, the file's data); ScheduleError (exit 2) or CannotJudge (exit 125)."""
    p = Path(path)
    data = read_json(p, "replay file")
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
    _check_top_level(p, data, s)
    return s, data


#: top-level fields and the JSON types they may have (None: absent or null is fine)
_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "mode": (str,), "sut": (str,), "profile": (str,), "written": (str,),
    "found_by": (str,), "note": (str,), "verdict": (dict,), "versions": (dict,), "git": (dict,),
    "confirmation": (dict,), "sut_tree": (dict,), "expect_by_release": (dict,),
    "differential": (dict,),
    "expect_invariants_by_release": (dict,)}


def _check_top_level(p: Path, data: dict, s: Schedule) -> None:
    """Every known top-level field has its type and agrees with the schedule (ScheduleError,
    exit 2, naming the file and the field): a file that says one thing and runs another is
    not replayed."""
    for name, types in _TYPES.items():
        v = data.get(name)
        if v is not None and not isinstance(v, types):
            raise ScheduleError(f"{p}: field '{name}': want {types[0].__name__}, got {v!r}",
                                (name,), "type")
    def bad(name: str, want: str) -> ScheduleError:
        return ScheduleError(f"{p}: field '{name}': {data[name]!r} {want}", (name,), "value")

    if data.get("kind") not in (None, "cpcheck-replay"):
        raise bad("kind", "is not 'cpcheck-replay'")
    if data.get("mode") not in (None, "inprocess", "torchrun"):
        raise bad("mode", "is not 'inprocess' or 'torchrun'")
    if data.get("sut") not in (None, s.sut):
        raise bad("sut", f"disagrees with the schedule's sut {s.sut!r}")
    if data.get("profile") not in (None, s.protocol):
        raise bad("profile", f"disagrees with the schedule's protocol {s.protocol!r}")
