"""`git bisect run cpcheck replay F --sut sglang@python` over SGLang's history, end to end.

A repository of released sources (one commit per release, 0.5.10.post1 .. 0.5.14, as
`python/sglang`) and a replay file that diverges before PR #20460 and agrees after it: the
bisect must name 0.5.11's commit as the first fixed one. Each step is a cold SGLang start on
the tree (two ranks importing SGLang, about 30-75 s on a loaded 2-core box; ~2-3 minutes in
all), so it is `soak` (nightly).

`git bisect run` reads exit 0 as old and 1..127 (but 125) as new; cpcheck answers 1 on a
divergence, which is the old side of a fix, so the run takes `--find-fix` (0 while the
divergence reproduces, 1 once it agrees, 125 skip unchanged) under the terms broken / fixed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.sglang_envs import need
from tests.sglang_history import build_history, git
from tests.subprocess_env import REPO, child_env

RELEASES = ["0.5.10.post1", "0.5.11", "0.5.13", "0.5.14"]
PRE_FIX = REPO / "scenarios" / "corpus" / "sglang" / \
    "replay-sglang-0.5.10.post1-dpattn-1x2-c9b8328630d0.json"


@pytest.mark.soak
@pytest.mark.sglang
@pytest.mark.timeout(1500)
def test_bisect_over_released_sources_names_the_fix(tmp_path: Path) -> None:
    need(*RELEASES)
    repo = tmp_path / "sglang"
    commits = build_history(repo, RELEASES)
    git(repo, "bisect", "start", "--term-old=broken", "--term-new=fixed",
        commits[RELEASES[-1]], commits[RELEASES[0]])
    run = subprocess.run(
        ["git", "-C", str(repo), "bisect", "run", sys.executable, "-m", "scenarios.cli",
         "replay", str(PRE_FIX), "--sut", "sglang@python", "--find-fix"],
        capture_output=True, text=True, env=child_env(), timeout=1400)
    log = git(repo, "bisect", "log")
    git(repo, "bisect", "reset")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{commits['0.5.11']} is the first fixed commit" in run.stdout, run.stdout[-3000:]
    assert "skip" not in log, log  # every step was judged, none skipped
    # each step ran the tree at that commit, not a release environment's copy
    assert "sglang tree: " in run.stdout and f"{repo}/python at " in run.stdout
