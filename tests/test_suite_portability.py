"""The default suite runs on any host: child processes keep the caller's PYTHONPATH, and the
storage backend that never came up is `unknown`, never a divergence."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.subprocess_env import REPO, child_env

TESTS = Path(__file__).resolve().parent


def test_no_test_replaces_pythonpath() -> None:
    """`env=dict(os.environ, PYTHONPATH=str(REPO))` drops what a GPU host put there."""
    replacing = re.compile(r"""PYTHONPATH["']?\s*[:=]\s*str\(""")
    offenders = [f"{p.name}:{i}" for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if replacing.search(line)]
    assert offenders == []


def test_child_env_extends_pythonpath(tmp_path: Path) -> None:
    (tmp_path / "only_here.py").write_text("VALUE = 42\n")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tmp_path)
    try:
        env = child_env()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), str(tmp_path)]
    out = subprocess.run([sys.executable, "-c", "import only_here, scenarios; "
                          "print(only_here.VALUE)"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.stdout.strip() == "42", out.stderr


def test_storage_that_never_came_up_is_unknown(monkeypatch) -> None:
    import scenarios.sut.reference_rank as rank_run
    from reference.api import StorageError
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.judging import run_checked
    from scenarios.sut.reference_executor import Executor

    def no_backend(backend, env):  # noqa: ANN001, ANN202
        raise StorageError("Mooncake master 127.0.0.1:9 unreachable (setup returned -1)")

    monkeypatch.setattr(rank_run, "make_storage", no_backend)
    with Executor("inprocess", timeout_s=2.0) as ex:
        _, verdict = run_checked(ex, load_scenario("write_acks"))
    assert verdict.status == "unknown" and verdict.exit_code == 125
    assert "storage backend 'memory' unavailable" in (verdict.diagnosis or "")
