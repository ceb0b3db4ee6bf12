"""The release matrix's cells on disk: one JSON file, rewritten atomically after every cell.

A matrix run takes hours on a shared box and may be cut at any moment, so each cell is written
the moment it starts ("running") and again when it finishes; a cut run leaves what it measured,
and `--resume` skips the cells that finished. Several files (runs on other branches or
machines) merge by cell; the later finished measurement of a cell wins.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scenarios.store.cell import FINISHED, Cell, cell_key

__all__ = ["FINISHED", "FORMAT", "Cell", "cell_key", "finished", "key_of", "load", "merge",
           "record", "save"]

FORMAT = "cpcheck-sglang-matrix/1"


def key_of(cell: Cell) -> str:
    return cell.key


def load(path: str | Path) -> dict[str, Cell]:
    """The cells of one file, by key; a missing file has none. A file that is not a cells file
    (or a cell that is not a cell: the field is named) is a usage error, not an empty matrix."""
    from scenarios.core.errors import UsageError

    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: not a matrix cells file ({e})") from None
    cells = data.get("cells") if isinstance(data, dict) else data  # a bare list is accepted
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "release" in c
                                              for c in cells):
        raise UsageError(f"{p}: not a matrix cells file (no list of cells with a release)")
    out: dict[str, Cell] = {}
    for i, row in enumerate(cells):
        try:
            c = Cell.model_validate(from_legacy(row))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise UsageError(f"{p}: cell {i} ({row.get('release')}): {where}: {err['msg']}"
                             ) from None
        out[c.key] = c
    return out


def from_legacy(row: dict) -> dict:
    """A row of the first matrix code (`--json` list: corpus "9/9 agree", verdict "flaky
    (...)", no replay confirmation) in this file's shape, marked `legacy`."""
    if not isinstance(row.get("corpus", {}), str) and "examples" not in row:
        return row
    import re

    out = {k: v for k, v in row.items() if k not in ("corpus", "examples", "first_s",
                                                      "shrunk_ops", "invariant", "replay")}
    out["legacy"] = True
    m = re.match(r"(\d+)/(\d+) (agree|diverge)", str(row.get("corpus", "")))
    if m:
        k, n = int(m.group(1)), int(m.group(2))
        out["corpus"] = {"n": n, "diverge": k if m.group(3) == "diverge" else 0}
    gen: dict = {"examples": row.get("examples", 0)}
    verdict = str(row.get("verdict", ""))
    if row.get("first_s") is not None:
        gen.update(first_s=row["first_s"], shrunk_ops=row.get("shrunk_ops"),
                   invariant=row.get("invariant"), replay=row.get("replay"))
    if verdict.startswith("flaky"):
        gen.update(reproduced="0/1", replay=row.get("replay"))
        # a corpus divergence outweighs a generated one that did not recur (as in cell_verdict)
        out["verdict"] = "diverge" if out.get("corpus", {}).get("diverge") else "flaky"
    elif verdict.startswith("diverge"):
        out["verdict"] = "diverge"
    elif verdict.startswith("cannot run here"):
        out["verdict"], out["why"] = "cannot", verdict
    elif verdict.startswith("error"):
        out["verdict"], out["error"] = "error", verdict
    out["generated"] = gen
    return out


def save(path: str | Path, cells: dict[str, Cell]) -> None:
    """Write all cells at once: a temporary file in the same directory, then a rename, so a
    reader (or a cut) never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(cells.values(), key=lambda c: order(c.key))
    body = json.dumps({"format": FORMAT, "cells": [c.to_json() for c in rows]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=".cells-", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(path: str | Path, cell: Cell) -> None:
    """Put one cell into the file (re-read first: the file is the truth, not our memory)."""
    cells = load(path)
    cells[cell.key] = cell
    save(path, cells)


def merge(*files: str | Path) -> dict[str, Cell]:
    """Cells of several files; for a cell in more than one, a finished one beats an unfinished
    one, then the later `finished_at` wins."""
    out: dict[str, dict] = {}
    for f in files:
        for k, c in load(f).items():
            old = out.get(k)
            if old is None or _rank(c) >= _rank(old):
                out[k] = c
    return out


def finished(cell: Cell | None) -> bool:
    return cell is not None and cell.finished


def _rank(c: Cell) -> tuple:
    return (c.finished, c.finished_at or "")


def order(key: str) -> tuple:
    release, dp, layout = key.split("|")
    return (release_sort_key(release), dp != "on", layout)


def release_sort_key(v: str) -> tuple:
    """0.5.9 < 0.5.10 < 0.5.10.post1 < 0.5.11 (numeric, a post release after its base)."""
    parts: list[Any] = []
    for p in v.split("."):
        if p.isdigit():
            parts.append((0, int(p), ""))
        elif p.startswith("post") and p[4:].isdigit():
            parts.append((1, int(p[4:]), ""))
        else:
            parts.append((2, 0, p))
    return tuple(parts)


#: the committed release matrix: what the project has judged so far
COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "sglang-matrix" / "cells.json"


def newest_judged(cells: dict[str, Cell]) -> str | None:
    """The newest release with a judged cell (agree, diverge or flaky): the last release the
    adapters are known to drive. A "cannot" or "error" cell judged nothing."""
    judged = {c.release for c in cells.values() if c.verdict in ("agree", "diverge", "flaky")}
    return max(judged, key=release_sort_key) if judged else None
