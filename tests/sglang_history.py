"""A git repository of SGLang's released sources, one commit (and one `vX.Y.Z` tag) per
release, laid out as an SGLang checkout: the package under `python/sglang`. What the bisect test
walks with `git bisect run cpcheck replay F --sut sglang@python`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from scenarios.sut.sglang import envs

_IDENT = ["-c", "user.name=cpcheck", "-c", "user.email=cpcheck@localhost",
          "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false"]


def git(repo: Path, *argv: str) -> str:
    out = subprocess.run(["git", *_IDENT, "-C", str(repo), *argv], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(argv)}: {out.stderr.strip()[-400:]}")
    return out.stdout.strip()


def build_history(repo: Path, releases: list[str]) -> dict[str, str]:
    """Commit each release's `sglang/` (from its built environment) as `python/sglang`, oldest
    first; {release: commit}."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("__pycache__/\n*.pyc\n")
    commits = {}
    for v in releases:
        dst = repo / "python" / "sglang"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(envs.release_dir(v) / "sglang", dst,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"sglang {v}")
        git(repo, "tag", f"v{v}")
        commits[v] = git(repo, "rev-parse", "HEAD")
    return commits
