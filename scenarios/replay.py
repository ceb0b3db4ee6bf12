"""Replay files: a failing Schedule plus everything needed to rerun it and judge it.

`cpcheck replay FILE` exits 0 (all ranks agree), 1 (they diverge) or 125 (cannot run here),
so `git bisect run cpcheck replay FILE` works.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from scenarios import __version__
from scenarios.checker import Verdict
from scenarios.schedule import Schedule, ScheduleError

EXIT_AGREE, EXIT_DIVERGE, EXIT_CANNOT_RUN = 0, 1, 125


def write_replay(s: Schedule, verdict: Verdict, out_dir: str | Path, mode: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"replay-{s.variant}-{s.layout}-{s.digest()}.json"
    path.write_text(json.dumps({
        "kind": "cpcheck-replay",
        "schedule": json.loads(s.model_dump_json()),
        "mode": mode,
        "verdict": verdict.to_dict(),
        "versions": {"cpcheck": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=1))
    return path


def read_replay(path: str | Path) -> tuple[Schedule, dict]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ScheduleError(f"{p}: no such replay file") from None
    except json.JSONDecodeError as e:
        raise ScheduleError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "schedule" not in data:
        raise ScheduleError(f"{p}: not a cpcheck replay file (no 'schedule')")
    return Schedule.from_dict(data["schedule"], str(p)), data
