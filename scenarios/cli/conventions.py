"""argparse conventions for `cpcheck`: `--version`, defaults shown in every help text.

Kept out of `cli.py` so the command definitions there stay about commands.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
from typing import Any, TextIO

from scenarios.core.contract import ExitCode
from scenarios.core.errors import CannotJudge, UsageError


def version_text() -> str:
    """`cpcheck X (torch Y, Python Z)`: what a bug report or a replay needs to name."""
    from scenarios import __version__

    try:
        import torch

        torch_v = torch.__version__
    except ImportError:  # still answer --version on a broken install
        torch_v = "not installed"
    return f"cpcheck {__version__} (torch {torch_v}, Python {platform.python_version()})"


class VersionAction(argparse.Action):
    """`--version`: print `version_text()` and exit 0 (torch is imported only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str = "print versions and exit") -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(0)


def _meaningful(default: Any) -> bool:
    # identity, not ==: a default of 0 is meaningful although 0 == False
    return not (default is None or default is False or default == "" or default == argparse.SUPPRESS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` for every option with a real default, even one without a help text;
    leaves alone help that already names its default and options whose default is unset."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and _meaningful(action.default):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not _meaningful(action.default):
            return text
        return super()._get_help_string(action)


def variant_help(what: str) -> str:
    """Help text for `--variant` that lists every variant this commit knows.

    Choices are listed, not enforced by argparse: a variant unknown at this commit is the
    command's to judge (a replay from a newer commit is 'cannot judge here', not bad usage).
    """
    from reference.api import VARIANTS

    return f"{what}; one of: {', '.join(VARIANTS)}"


def check_variant_arg(name: str) -> str:
    """`--variant`: reference.api's check (its one message), as a usage error (exit 2)."""
    from reference.api import UnknownVariantError, check_variant

    try:
        return check_variant(name)
    except UnknownVariantError as e:
        raise UsageError(str(e)) from None


# -- argument types: NaN, inf, zero and negatives are usage errors, not a 0-run "AGREE" --------
def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the verdict as one JSON object on stdout (human lines go to stderr)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Mooncake's own log and tracebacks of internal errors")


def human(args: argparse.Namespace) -> TextIO:
    """Where human lines go: stdout, or stderr when stdout carries --json."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def emit_json(args: argparse.Namespace, payload: dict) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"command": args.cmd, **payload}, default=str), flush=True)


def emit_verdict(args: argparse.Namespace, v: Any, code: int | None = None, replay: Any = None,
                 **extra: Any) -> None:
    """`--json`: a judged run's Verdict as one object, with the same keys from every command."""
    emit_json(args, {"status": v.status, "invariant": v.invariant, "message": v.message,
                     "diagnosis": v.diagnosis,
                     "exit_code": int(v.exit_code if code is None else code),
                     "confirmed_by_replay": v.stats.get("confirmed_by_replay"),
                     "replay": str(replay) if replay else None, **extra})


def emit_status(args: argparse.Namespace, status: str, code: int, line: str | None = None) -> None:
    """`--json` with no Verdict to print (a refusal, an error, nothing found): the same keys."""
    emit_json(args, {"status": status, "invariant": None, "message": line,
                     "diagnosis": line if code == ExitCode.UNKNOWN else None,
                     "exit_code": int(code), "confirmed_by_replay": None, "replay": None})


def check_device(device: str) -> None:
    """CannotJudge (exit 125) for --device cuda on a host without CUDA, before any run."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CannotJudge("--device cuda, but this host has no usable CUDA device")
