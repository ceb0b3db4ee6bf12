"""The command line: one set of commands (run, replay, explore, soak, diff, matrix, ...)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`cpcheck`'s entry point (imports the parser only when called)."""
    from scenarios.cli.main import main as _main

    return _main(argv)
