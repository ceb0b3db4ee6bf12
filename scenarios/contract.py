"""The exit-code contract, in one place: every subcommand ends with one of these codes.

`git bisect run` reads them: 0 good, 1 bad, 125 skip. Anything that is not a reproducible
verdict about the system under test must never exit 1.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    AGREE = 0  # every rank agreed (and the oracle found nothing)
    DIVERGE = 1  # the system under test diverged, reproducibly
    USAGE = 2  # bad flag, bad file, unwritable output: found before any work starts
    UNKNOWN = 125  # cannot judge here: infrastructure broke the run or this commit cannot run it


class UsageError(ValueError):
    """Bad input, found before any work starts: one line, exit 2."""

    exit_code = ExitCode.USAGE


class CannotJudge(RuntimeError):
    """Infrastructure, not the system under test: verdict `unknown`, exit 125.

    `diagnosis` says what broke (master unreachable, rank killed by the OS, too many ranks,
    unknown variant / profile / SUT at this commit, newer file schema).
    """

    exit_code = ExitCode.UNKNOWN

    def __init__(self, diagnosis: str) -> None:
        super().__init__(diagnosis)
        self.diagnosis = diagnosis
