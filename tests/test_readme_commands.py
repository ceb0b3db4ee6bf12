"""The README's command-line walkthrough runs as written and ends with the exit codes it states.

The walkthrough is the fenced bash between `<!-- walkthrough: begin -->` and
`<!-- walkthrough: end -->`; every command there ends with `# exit N`. They run in order, in a
fresh folder, with `cpcheck` meaning `python -m scenarios.cli` (the console script is
`scenarios.cli:main`, checked below). To keep the suite quick they run in ONE child process
that calls `scenarios.cli.main` per command (one torch import instead of seven), expanding
globs as bash does. Outside the walkthrough, on purpose, and not run here: the two "Set up and
run" commands (install, then a one-minute soak or the whole suite: CI runs both) and the
10-minute soak example (too long for the suite); the SGLang examples need built environments
(`tests/test_sglang_sut.py` drives those).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scenarios.core.contract import ExitCode
from tests.subprocess_env import REPO, child_env

BEGIN, END = "<!-- walkthrough: begin -->", "<!-- walkthrough: end -->"

#: runs each command of argv[1] (a JSON list) through cli.main in this process, in order;
#: after each one, the list of exit codes so far goes to argv[2] (a crash keeps what ran)
DRIVER = r"""
import glob, json, shlex, sys
from scenarios.cli import main
codes = []
for cmd in json.loads(sys.argv[1]):
    argv = []
    for tok in shlex.split(cmd)[1:]:
        hits = sorted(glob.glob(tok)) if any(c in tok for c in "*?[") else []
        argv += hits or [tok]  # bash keeps a pattern that matches nothing as it is
    print(f"=== {cmd}  (argv {argv})", file=sys.stderr, flush=True)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --version / --help / bad flags
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    codes.append(int(code))
    open(sys.argv[2], "w").write(json.dumps(codes))
"""


def walkthrough(readme: str) -> list[tuple[str, int]]:
    """(command, stated exit code) for each command of the walkthrough, in order."""
    if BEGIN not in readme or END not in readme:
        raise ValueError("README.md has no walkthrough markers")
    section = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
    if not blocks:
        raise ValueError("the walkthrough has no ```bash block")
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.fullmatch(r"(cpcheck\s.*?)\s+#\s*exit (\d+)\b.*", line.strip())
            if m is None:
                raise ValueError(f"walkthrough line without 'cpcheck ... # exit N': {line!r}")
            code = int(m.group(2))
            if code not in {int(c) for c in ExitCode}:
                raise ValueError(f"{line!r}: exit {code} is not in the exit-code contract")
            commands.append((m.group(1), code))
    return commands


def run_walkthrough(commands: list[tuple[str, int]], cwd: Path,
                    timeout_s: float = 400) -> tuple[list[int], str]:
    """Exit codes of the commands, run in order in `cwd`, and everything they printed."""
    result = cwd / ".codes.json"
    env = child_env(MPLBACKEND="Agg")
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([c for c, _ in commands]),
                        str(result)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout_s)
    codes = json.loads(result.read_text()) if result.exists() else []
    return codes, f"driver exit {p.returncode}\n{p.stderr[-6000:]}\n{p.stdout[-3000:]}"


def mismatches(commands: list[tuple[str, int]], codes: list[int]) -> list[str]:
    out = [f"{cmd!r}: README says exit {want}, got {got}"
           for (cmd, want), got in zip(commands, codes, strict=False) if want != got]
    if len(codes) < len(commands):
        out.append(f"only {len(codes)} of {len(commands)} commands ran")
    return out


def test_walkthrough_runs_as_written(tmp_path: Path) -> None:
    commands = walkthrough((REPO / "README.md").read_text())
    assert len(commands) >= 5
    work = tmp_path / "fresh"
    work.mkdir()
    # one planted line after the README's (same child process, so it costs no second import):
    # it states 0 where the command exits 2, the old walkthrough's failure (its `replay
    # cpcheck-out/replay-*.json` matched two files), and the comparison must name it
    planted = ("cpcheck replay no-such-dir/replay-*.json", 0)
    codes, log = run_walkthrough([*commands, planted], work)
    assert mismatches(commands, codes[:len(commands)]) == [], log
    assert mismatches([planted], codes[len(commands):]) == [
        f"{planted[0]!r}: README says exit 0, got 2"], log
    assert list((work / "out" / "explore").glob("replay-*.json")), log


def test_the_entry_point_is_the_one_the_test_calls() -> None:
    assert 'cpcheck = "scenarios.cli:main"' in (REPO / "pyproject.toml").read_text()
    module_run = (REPO / "scenarios" / "cli" / "__main__.py").read_text()
    assert "from scenarios.cli import main" in module_run and "sys.exit(main())" in module_run


def test_setup_commands_are_the_ones_ci_runs() -> None:
    """The two "Set up and run" commands stay outside the walkthrough (install, minutes of
    soak or suite); CI's entry point runs the same test command."""
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set up and run", 1)[1].split("## ", 1)[0]
    assert "bash scripts/install.sh && .venv/bin/python -m pytest -n auto" in setup
    assert "bash scripts/install.sh && .venv/bin/cpcheck soak --minutes 1" in setup
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/install.sh" in ci and ".venv/bin/python -m pytest -n auto" in ci
    assert BEGIN not in setup


def test_the_parser_refuses_a_command_without_its_exit_code() -> None:
    good = f"{BEGIN}\n```bash\ncpcheck list  # exit 0: fine\n```\n{END}\n"
    assert walkthrough(good) == [("cpcheck list", 0)]
    with pytest.raises(ValueError, match="without"):
        walkthrough(good.replace("  # exit 0: fine", ""))
    with pytest.raises(ValueError, match="contract"):
        walkthrough(good.replace("exit 0", "exit 3"))
    with pytest.raises(ValueError, match="markers"):
        walkthrough("no walkthrough here")
    continued = f"{BEGIN}\n```bash\ncpcheck run x \\\n    --json  # exit 1\n```\n{END}\n"
    assert walkthrough(continued) == [("cpcheck run x      --json", 1)]
    assert shlex.split(walkthrough(continued)[0][0]) == ["cpcheck", "run", "x", "--json"]
