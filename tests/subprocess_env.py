"""The environment for a child process the tests start: PYTHONPATH extended, never replaced.

Replacing it drops whatever the caller put there (dependencies installed with `--target`, a
site directory on a GPU host), and the child then fails to import them.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH (what was there is kept after it)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return env
