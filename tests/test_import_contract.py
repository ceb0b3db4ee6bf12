"""The import contract in pyproject.toml holds here, and each of its contracts can fire.

CI runs `lint-imports` directly; this test plants one violation per contract in a copy of the
tree and checks that import-linter names it, so a contract that silently matches nothing (a
renamed package, a wildcard gone wrong) fails the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

REPO = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache", "--no-logo"], cwd=root, text=True,
        capture_output=True, timeout=120,
        # `root` first (it may be a planted copy), what the caller had kept after it
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])},
    )


def test_the_tree_keeps_every_contract() -> None:
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " kept, 0 broken" in r.stdout and "BROKEN" not in r.stdout


def test_each_contract_fires_on_a_planted_violation(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for name in ("reference", "scenarios", "tests", "benchmarks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    # reference imports the harness
    with (root / "reference" / "hashing.py").open("a") as f:
        f.write("\nfrom scenarios.core.schedule import Schedule  # noqa: E402,F401\n")
    # the harness reaches past reference.api
    with (root / "scenarios" / "core" / "layout.py").open("a") as f:
        f.write("\nfrom reference.variants import VARIANTS  # noqa: E402,F401\n")
    # a cycle between roles: core -> cli -> core
    with (root / "scenarios" / "core" / "contract.py").open("a") as f:
        f.write("\nimport scenarios.cli.main  # noqa: E402,F401\n")
    # a lower role reaching up: one rank's client imports the judge
    with (root / "scenarios" / "client" / "gates.py").open("a") as f:
        f.write("\nimport scenarios.judge.checker  # noqa: E402,F401\n")
    r = _lint(root)
    out = r.stdout
    assert r.returncode != 0
    for name in ("reference/ (the system under test) never imports the harness",
                 "the harness reaches reference/ only through reference.api",
                 "no import cycles between the modules of a package",
                 "each role of scenarios/ imports only the roles below it"):
        assert f"{name} BROKEN" in out, out
    assert "reference.hashing -> scenarios.core.schedule" in out
    assert "scenarios.core.layout -> reference.variants" in out
    assert "No cycles are allowed in scenarios" in out
    assert "scenarios.client is not allowed to import scenarios.judge" in out
    assert "scenarios.client.gates -> scenarios.judge.checker" in out
