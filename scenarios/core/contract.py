"""The exit-code contract, in one place: every subcommand ends with one of these codes.

`git bisect run` reads them: 0 good, 1 bad, 125 skip. Anything that is not a reproducible
verdict about the system under test must never exit 1. Errors are classified by their exception
TYPE (`classify`: each carries its `exit_code`, scenarios/core/errors.py), never by the words in
their message. An exception nobody anticipated is an internal error of the harness, not a
verdict on the system under test: it exits 125 too.
"""

from __future__ import annotations

import sys
import threading
from enum import IntEnum
from typing import Literal

Status = Literal["agree", "diverge", "unknown"]


class ExitCode(IntEnum):
    AGREE = 0  # every rank agreed (and the oracle found nothing)
    DIVERGE = 1  # the system under test diverged, reproducibly (confirmed by a replay)
    USAGE = 2  # bad flag, bad file, unwritable output: found before any work starts
    UNKNOWN = 125  # cannot judge here: infrastructure broke the run or this commit cannot run it
    INTERRUPTED = 130  # Ctrl-C / SIGTERM before a verdict (git bisect run stops)


#: the verdict's status -> the exit code it ends with
STATUS_EXIT: dict[str, ExitCode] = {"agree": ExitCode.AGREE, "diverge": ExitCode.DIVERGE,
                                    "unknown": ExitCode.UNKNOWN}

#: (code, meaning) rows; README.md and `cpcheck --help` print exactly these
TABLE: tuple[tuple[int, str], ...] = (
    (ExitCode.AGREE, "agree: every rank made the same decisions and computed the same keys"),
    (ExitCode.DIVERGE, "diverge: the system under test diverged, confirmed by one replay"),
    (ExitCode.USAGE, "usage: bad flag, bad or empty file, bad value, unwritable --out; "
                     "found before any work starts"),
    (ExitCode.UNKNOWN, "unknown, cannot judge here: master unreachable or lost without an "
                       "asked-for restart, a rank killed by the OS, too many ranks, no CUDA for "
                       "--device cuda, a divergence that did not reproduce (flaky), an unknown "
                       "variant / profile / SUT or a newer file schema at this commit, or an "
                       "internal error of the harness"),
    (ExitCode.INTERRUPTED, "interrupted (Ctrl-C, SIGTERM) before any divergence was found; "
                           "a soak still writes its report"),
)


def epilog() -> str:
    """The table for argparse's epilog (RawDescriptionHelpFormatter keeps the lines)."""
    return "exit codes:\n" + "\n".join(f"  {int(c):>3}  {m}" for c, m in TABLE)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every `with` block cleans up."""


#: set by the CLI's SIGINT / SIGTERM handler; long loops check it, because the exception the
#: handler raises can be swallowed (a handler that runs inside a GC callback, e.g. Hypothesis's)
stop_requested = threading.Event()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def classify(exc: BaseException) -> tuple[ExitCode, str]:
    """(exit code, one line) for an exception that ended a subcommand, by its type alone."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    code = getattr(type(exc), "exit_code", None)  # the harness's own (scenarios/core/errors.py)
    if isinstance(code, int) and code in (ExitCode.USAGE, ExitCode.UNKNOWN):
        return ExitCode(code), _first_line(exc)
    # the one foreign type: a storage backend of the reference failing outside any run (a
    # master that does not answer); its module is loaded wherever one can be raised
    api = sys.modules.get("reference.api")
    if api is not None and isinstance(exc, api.StorageError):
        return ExitCode.UNKNOWN, _first_line(exc)
    return ExitCode.UNKNOWN, f"internal error: {type(exc).__name__}: {_first_line(exc)}"
