"""The command line: one set of commands (run, replay, explore, soak, diff, matrix, ...)."""

from __future__ import annotations

import signal

#: SIGINT / SIGTERM that arrived while the commands were loading (torch takes seconds): the
#: command acts on them once its own handlers are in (exit 130, the soak's report finished)
EARLY_SIGNALS: list[int] = []


def _note(signum: int, frame: object) -> None:
    EARLY_SIGNALS.append(signum)


def main(argv: list[str] | None = None) -> int:
    """`cpcheck`'s entry point (imports the parser only when called)."""
    if argv is None:  # the process itself: no signal may kill it silently while it loads
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _note)
    from scenarios.cli.main import main as _main

    return _main(argv)
