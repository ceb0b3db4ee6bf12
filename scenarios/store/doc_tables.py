"""Tables that commands write into docs/, between generated markers.

A table a command produces (the release matrix, the profile table, the detection table) is
never edited by hand: the command writes it into its docs file between a BEGIN and an END
marker, and a test regenerates it from the committed inputs and compares. Text outside the
markers (the prose around the table) is the author's and is kept as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from scenarios.core.errors import MarkerError
from scenarios.store.report import atomic_write_text


def begin_marker(name: str, command: str) -> str:
    return f"<!-- BEGIN GENERATED {name}: {command} (do not edit by hand) -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED {name} -->"


def _span(text: str, name: str) -> tuple[int, int] | None:
    """(start, end) of the whole marked block, markers included, or None when absent."""
    begin = re.search(rf"^<!-- BEGIN GENERATED {re.escape(name)}: .*-->$", text, re.M)
    end = re.search(rf"^{re.escape(end_marker(name))}$", text, re.M)
    if begin is None and end is None:
        return None
    if begin is None or end is None or end.start() < begin.end():
        raise MarkerError(f"table {name!r}: unmatched BEGIN / END GENERATED markers")
    return begin.start(), end.end()


def replace_block(text: str, name: str, body: str, command: str) -> str:
    """`text` with the block `name` set to `body` (appended at the end when absent)."""
    block = f"{begin_marker(name, command)}\n{body.rstrip()}\n{end_marker(name)}"
    span = _span(text, name)
    if span is None:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    return text[:span[0]] + block + text[span[1]:]


def read_block(text: str, name: str) -> str:
    """The body of block `name` (what the command wrote), without its markers."""
    span = _span(text, name)
    if span is None:
        raise MarkerError(f"table {name!r}: no BEGIN GENERATED marker")
    inner = text[span[0]:span[1]].split("\n")
    return "\n".join(inner[1:-1])


def write_block(path: str | Path, name: str, body: str, command: str,
                title: str = "") -> Path:
    """Write the block into `path` (created with `title` as its heading when missing)."""
    p = Path(path)
    text = p.read_text() if p.exists() else (f"# {title}\n" if title else "")
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, replace_block(text, name, body, command))
    return p
