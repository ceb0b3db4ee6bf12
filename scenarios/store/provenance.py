"""Where a result came from: the git commit (and whether the tree was dirty), cpcheck's version
and the command line. Light on purpose (no torch): a soak writes it in its first second."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scenarios import __version__
from scenarios.core.config import REPO_ROOT


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
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


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """git commit, cpcheck version, command line and start time (UTC) of this process."""
    return {"git": git_state(), "cpcheck": __version__,
            "argv": list(argv) if argv is not None else ["cpcheck", *sys.argv[1:]],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
