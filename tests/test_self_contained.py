"""The repository stands alone: no tracked file points outside it.

Design facts live in docs/design/. A file that cites the notes once kept in a sibling `shared`
folder of the checkout, or a path on the machine that wrote it (a home or work folder), sends a
reader to something they do not have. Scratch paths under /tmp are fine (scripts write there).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.subprocess_env import REPO

# spelled in pieces so that this file does not match itself
FORBIDDEN = re.compile("|".join([
    re.escape("../" + "shared"),
    re.escape("shared" + "/design"),
    r"(?<![\w.~-])/(?:" + "work|root|home|Users" + r")/",
]))
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".hypothesis", "cpcheck-out"}


def tracked_files(root: Path) -> list[Path]:
    """What git tracks under `root`; every file but the usual local folders without git."""
    if shutil.which("git") and (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                             check=True).stdout
        return [root / p for p in out.decode().split("\0") if p]
    return [p for p in root.rglob("*")
            if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts)]


def outside_references(root: Path, files: list[Path]) -> list[str]:
    """`path:line: text` for every line of a text file that points outside the repository."""
    hits = []
    for path in files:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):  # deleted in the worktree, a submodule
            continue
        if b"\0" in data[:8192]:
            continue  # binary (plots)
        text = data.decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(root)}:{n}: {line.strip()[:120]}")
    return hits


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def broken_links(root: Path, files: list[Path]) -> list[str]:
    """`path: target` for every relative Markdown link that names no file or folder."""
    bad = []
    for path in files:
        if path.suffix != ".md" or not path.exists():
            continue
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            if not (path.parent / target).exists():
                bad.append(f"{path.relative_to(root)}: {target}")
    return bad


def test_every_relative_link_in_the_docs_resolves(tmp_path: Path) -> None:
    assert broken_links(REPO, tracked_files(REPO)) == []
    (tmp_path / "a.md").write_text("[ok](b.md) [web](https://example.org) [gone](docs/x.md#y)\n")
    (tmp_path / "b.md").write_text("[back](a.md#top)\n")
    assert broken_links(tmp_path, sorted(tmp_path.iterdir())) == ["a.md: docs/x.md"]


SOURCE_PATH = re.compile(r"\b((?:scenarios|reference|tests|benchmarks|scripts)/[\w/]+\.(?:py|sh|toml))\b")


def missing_paths(root: Path, docs: list[Path]) -> list[str]:
    """`doc: path` for every repository file a living doc names that does not exist."""
    return [f"{d.relative_to(root)}: {m}" for d in docs for m in SOURCE_PATH.findall(d.read_text())
            if not (root / m).exists()]


def test_the_living_docs_name_files_that_exist(tmp_path: Path) -> None:
    """README.md and docs/design/ say where things are; after a move they must follow.
    (Dated measurements and findings keep the paths of their day.)"""
    docs = [REPO / "README.md", *sorted((REPO / "docs" / "design").glob("*.md"))]
    assert len(docs) >= 6 and missing_paths(REPO, docs) == []
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "here.py").write_text("")
    (tmp_path / "d.md").write_text("`scenarios/here.py` and `scenarios/moved.py`\n")
    assert missing_paths(tmp_path, [tmp_path / "d.md"]) == ["d.md: scenarios/moved.py"]


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = tracked_files(REPO)
    assert len(files) > 50 and any(p.name == "README.md" for p in files)
    assert outside_references(REPO, files) == []


def test_the_check_fires_on_each_kind_of_reference(tmp_path: Path) -> None:
    planted = {
        "a.py": "# facts in " + "../" + "shared/notes.md\n",
        "b.md": "see " + "shared" + "/design/protocol.md\n",
        "c.json": '{"replay": "/' + 'work/wt/p13/docs/replay.json"}\n',
        "d.sh": "cd /" + "root/cpcheck\n",
        "e.txt": "log in /" + "home/alice/out\n",
    }
    clean = {
        "ok.sh": "OUT=/tmp/gpu-bench-out\n",
        "ok.md": "see docs/design/protocol-by-release.md and ./work/notes, not a path\n",
        "plot.png": "\0binary /" + "work/ bytes",
    }
    for name, text in {**planted, **clean}.items():
        (tmp_path / name).write_text(text)
    hits = outside_references(tmp_path, sorted(tmp_path.iterdir()))
    assert sorted(h.split(":", 1)[0] for h in hits) == sorted(planted)
