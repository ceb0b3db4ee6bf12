"""SGLang from a source tree (`--sut sglang@PATH`): PATH holds the `sglang` package, e.g. an
SGLang checkout's `python/`, so that `git bisect run cpcheck replay F --sut sglang@python` walks
SGLang's own history.

A tree brings only SGLang's code: its dependencies come from a built release environment
(envs.py), the one closest to the tree's own release, with PATH in front of it on the workers'
path. Every verdict and replay file records the tree, its git commit and whether it had changes.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from scenarios.core.errors import CannotJudge, UsageError
from scenarios.sut.sglang import envs

_PYPROJECT_VERSION = re.compile(r'^\s*version\s*=\s*"([^"]+)"', re.M)
_RELEASE_PREFIX = re.compile(r"v?(\d+\.\d+\.\d+(?:\.post\d+)?)")


@dataclass(frozen=True)
class SglangTree:
    """One source tree as it was when the run started."""

    path: str  #: absolute path of the directory holding `sglang/`
    commit: str | None  #: git commit of the tree, None outside git (or untracked files)
    dirty: bool | None  #: tracked files under `path` changed since `commit`
    release: str | None  #: the release the tree is at (pyproject or the nearest git tag)
    env: str  #: the built release environment whose dependencies the run borrows

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        at = self.commit[:12] if self.commit else "no git commit"
        return f"tree {self.path} at {at}{' (dirty)' if self.dirty else ''}"


def check_tree(path: str) -> Path:
    """The directory PATH as an absolute path; a usage error (one line) unless it holds the
    `sglang` package."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"--sut sglang@{path}: '{path}' is not a directory (give the directory "
                         "that holds the sglang package, e.g. an SGLang checkout's python/)")
    if not (p / "sglang" / "__init__.py").is_file():
        raise UsageError(f"--sut sglang@{path}: no sglang package under '{path}' (no "
                         "sglang/__init__.py; give e.g. an SGLang checkout's python/)")
    return p.resolve()


def _git(root: Path, *argv: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_of(root: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the tree; (None, None) unless its `sglang/__init__.py` is tracked by
    git (a tree copied into some other repository's ignored folder has no commit of its own)."""
    if _git(root, "ls-files", "--error-unmatch", "sglang/__init__.py") is None:
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit, (bool(status) if status is not None else None)


def release_of(root: Path) -> str | None:
    """The release a tree is at: `version = "..."` in PATH/pyproject.toml (SGLang's python/
    until setuptools-scm), else the nearest `vX.Y.Z` git tag; None if neither says."""
    pyproject = root / "pyproject.toml"
    candidates = []
    if pyproject.is_file():
        m = _PYPROJECT_VERSION.search(pyproject.read_text(errors="replace"))
        if m:
            candidates.append(m.group(1))
    tag = _git(root, "describe", "--tags", "--abbrev=0", "--match", "v[0-9]*")
    if tag:
        candidates.append(tag)
    for c in candidates:
        m = _RELEASE_PREFIX.match(c.strip())
        if m:
            return m.group(1)
    return None


def built_releases(root: Path | None = None) -> list[str]:
    """Every release whose environment is built (manifest ok, directory present), oldest first."""
    base = root or envs.ROOT
    out = []
    for man in base.glob("*.json") if base.is_dir() else []:
        v = man.stem
        try:
            envs.parse_release(v)
        except UsageError:
            continue
        m = envs.load_manifest(v, base)
        if m is not None and m.ok and envs.release_dir(v, base).is_dir():
            out.append(v)
    return sorted(out, key=envs.parse_release)


def closest_env(release: str | None, built: list[str]) -> str | None:
    """The built environment a tree at `release` borrows: the newest built release not newer
    than it (its dependency pins are the nearest), else the oldest built one; a tree with no
    known release takes the newest."""
    if not built:
        return None
    if release is None:
        return built[-1]
    want = envs.parse_release(release)
    older = [v for v in built if envs.parse_release(v) <= want]
    return older[-1] if older else built[0]


def open_tree(path: str, *, build: bool = True, log=print) -> SglangTree:  # noqa: ANN001
    """Check PATH (usage error if it holds no sglang package), read its git state and release,
    and pick the environment it runs with (building the tree's own release if none is built)."""
    root = check_tree(path)
    commit, dirty = git_of(root)
    release = release_of(root)
    env = closest_env(release, built_releases())
    if env is None:
        if release is None or not build:
            raise CannotJudge(f"sglang tree {root}: no built SGLang environment to take its "
                              "dependencies from: run python -m scenarios.sut.sglang.envs VERSION")
        envs.build_release(release, log=log)
        env = release
    return SglangTree(str(root), commit, dirty, release, env)


def worker_path(tree: SglangTree | None, env_version: str) -> list[str]:
    """What a worker puts in front of its PYTHONPATH: the release environment, with a source
    tree's `sglang` package ahead of the release's own."""
    front = [tree.path] if tree is not None else []
    return front + envs.pythonpath(env_version).split(os.pathsep)
