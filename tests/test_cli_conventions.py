"""CLI conventions: `--version` exits 0 naming cpcheck, torch and Python; help shows defaults;
`--variant` lists every variant this commit knows."""

from __future__ import annotations

import argparse
import platform
import re

import pytest
import torch

from reference.api import VARIANTS
from scenarios import __version__
from scenarios.cli.main import build_parser, main


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping


def test_version_flag_exits_0_with_every_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"cpcheck {__version__} (torch {torch.__version__}, "
                           f"Python {platform.python_version()})")
    assert main(["version"]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize("cmd", ["run", "explore", "soak"])
def test_variant_help_lists_every_variant(capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    argv = [cmd, "write_acks"] if cmd == "run" else [cmd]
    text = _help(capsys, *argv)
    assert "one of: " + ", ".join(VARIANTS) in text.replace("- ", "-")


@pytest.mark.parametrize("cmd", ["run", "replay", "explore", "soak"])
def test_help_shows_defaults(capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    text = _help(capsys, cmd)
    assert "(default: 10.0)" in text  # --timeout, which names no default in its help
    assert "(default: auto)" in text  # --device, which has no help text at all
    assert "(default: None)" not in text  # unset defaults are not shown as None
    if cmd == "explore":
        assert "(default: 0)" in text  # --seed 0 is a real default although 0 == False
    if cmd == "soak":  # --seed has no fixed default there (a fresh random one): help says so
        assert "default: a fresh random seed" in " ".join(text.split())


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("cmd", _subcommands())
def test_every_subcommand_shows_its_defaults(capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    """The SGLang subcommands too (they were added without the help formatter once): every
    option with a real default names it."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[cmd]
    body = " " + _help(capsys, cmd).split(" options: ", 1)[1]
    for action in parser._actions:
        d = action.default
        if not action.option_strings or d in (None, False, "", argparse.SUPPRESS) or \
                action.dest == "help":
            continue
        opt = action.option_strings[-1]
        entry = re.split(r" --?[a-z]", body.split(f" {opt}", 1)[1], maxsplit=1)[0]
        assert "default" in entry, f"{cmd} {opt}: default {d!r} not shown in {entry!r}"
