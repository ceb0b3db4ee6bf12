"""Print the release-matrix table from one or more cells files, or write it into its docs file.

    python -m scenarios.store.matrix_table cpcheck-out/matrix/cells.json [other.json ...]
        [--details]
    python -m scenarios.store.matrix_table docs/sglang-matrix/cells.json \
        --write docs/sglang-release-matrix.md   # the committed table, between its markers

Rows: release x DP attention (on, off); columns: 1x2, 2x2 and the PP layout 1x1x2. A cell reads
"diverge [writing_check], 5.2 s, 7 ops, replay 3/3, corpus 1/9", "agree (corpus 9/9, 5
generated)", "flaky [...]: ... 0/3 on replay", "error: ...", "not finished" (a cut run) or
"not run". Several files merge by cell (the later finished measurement wins), so a second
machine's or branch's cells join the same table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scenarios.core.config import MATRIX_LAYOUTS
from scenarios.store import matrix_cells
from scenarios.store.cell import Cell, GeneratedResult
from scenarios.store.doc_tables import write_block

LAYOUTS = MATRIX_LAYOUTS
#: the name of the table's block in its docs file
TABLE = "release-matrix"


def _corpus(c: Cell) -> str:
    cp = c.corpus
    if cp is None or not cp.n:
        return ""
    n = cp.n - cp.cannot  # files the release can run at all
    parts = [f"corpus {cp.diverge}/{n} diverge" if cp.diverge
             else f"corpus {cp.agreed}/{n} agree"]
    div = cp.divergent
    if div:
        invs = sorted({str(f.invariant) for f in div})
        reps = sorted({str(f.reproduced) for f in div})
        parts[0] += (f" ([{', '.join(invs)}], replay "
                     + (f"{reps[0]} each" if len(reps) == 1 and len(div) > 1 else
                        ", ".join(str(f.reproduced) for f in div)) + ")")
    if cp.flaky:
        parts.append(f"{cp.flaky} corpus run(s) diverged once, agreed on every replay")
    if cp.error:
        parts.append(f"{cp.error} corpus run(s) not judged (pool error)")
    if cp.cannot:
        parts.append(f"{cp.cannot} corpus file(s) need a seam this release lacks")
    return ", ".join(parts)


def _invariant(summary: str) -> str:
    """' [tree]' from a verdict summary 'DIVERGE [tree]: ...', else ''."""
    if "[" in summary and "]" in summary:
        return " " + summary[summary.index("["):summary.index("]") + 1]
    return ""


def cell_text(c: Cell | None) -> str:
    if c is None:
        return "not run"
    if c.verdict == "running":
        return f"not finished (cut; started {c.started_at or '?'})"
    if c.verdict == "cannot":
        return "cannot run here (125)"
    if c.verdict == "error" and c.error is not None:
        return f"error: {c.error[:100]}"
    gen = c.generated or GeneratedResult()
    corpus = _corpus(c)
    bits: list[str] = []
    if gen.found:
        k = gen.reproduced
        if k is not None and not k.recurred:
            seen = _invariant(gen.shrunk_seen or gen.first_seen or "")
            when = f" ({gen.first_s} s)" if gen.first_s is not None else ""
            bits.append(f"generated{seen}: diverged once{when}, {k} on replay")
        else:
            bits.append(f"[{gen.invariant}], {gen.first_s} s, {gen.shrunk_ops} ops, "
                        + (f"replay {k}" if k else "not replay-confirmed (first matrix code)"))
    else:
        bits.append(f"{gen.examples} generated agree")
    if gen.infra_errors:
        bits.append(f"{len(gen.infra_errors)} generated run(s) not judged (pool error)")
    if corpus:
        bits.append(corpus)
    return f"{c.verdict}: " + ", ".join(bits) if c.verdict != "agree" else \
        "agree (" + ", ".join(bits) + ")"


def render(cells: dict[str, Cell], releases: list[str] | None = None) -> str:
    rel = releases or sorted({c.release for c in cells.values()},
                             key=matrix_cells.release_sort_key)
    lines = ["| release | DP attention | " + " | ".join(LAYOUTS) + " |",
             "|---|---|" + "---|" * len(LAYOUTS)]
    for v in rel:
        for dp in (True, False):
            row = [cell_text(cells.get(matrix_cells.cell_key(v, dp, lay))) for lay in LAYOUTS]
            lines.append(f"| {v} | {'on' if dp else 'off'} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def details(cells: dict[str, Cell]) -> str:
    """Per cell: when, how long, the load, the command and the replay file."""
    lines = ["| cell | class | finished | s | load (start, end) | generated | replay | command |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted(cells, key=matrix_cells.order):
        c = cells[k]
        gen = c.generated or GeneratedResult()
        load = f"{(c.loadavg_start or ['?'])[0]}, {(c.loadavg_end or ['?'])[0]}"
        replay = (gen.replay or "").rsplit("/", 1)[-1]
        lines.append(f"| {k} | {c.cache_class or ''} | {c.finished_at or ''} | "
                     f"{_or_blank(c.seconds)} | {load} | "
                     f"{gen.examples if c.generated else ''} (seed {_or_blank(gen.seed)}) | "
                     f"{replay} | `{c.command or ''}` |")
    return "\n".join(lines)


def _or_blank(x: object) -> str:
    return "" if x is None else str(x)


def divergences(cells: dict[str, Cell]) -> str:
    """Every divergence behind the table: cell, where it came from (a corpus file or the
    generated hunt's replay file), invariant, replays that reproduced it, the verdict."""
    lines = ["| cell | source | invariant | reproduced | verdict |", "|---|---|---|---|---|"]
    for k in sorted(cells, key=matrix_cells.order):
        c = cells[k]
        for f in (c.corpus.files if c.corpus else []):
            if f.verdict in ("diverge", "flaky"):
                lines.append(f"| {k} | corpus {f.file} | {f.invariant} | "
                             f"{f.reproduced} | {_cell_md(f.message or '')} |")
        gen = c.generated or GeneratedResult()
        if gen.first_s is not None:
            seen = gen.shrunk_seen or gen.first_seen or gen.message or ""
            lines.append(f"| {k} | generated {(gen.replay or '').rsplit('/', 1)[-1]} | "
                         f"{gen.invariant or _invariant(seen).strip(' []') or '-'} | "
                         f"{gen.reproduced} | {_cell_md(seen)} |")
        for path in gen.infra_replays:
            lines.append(f"| {k} | not judged {path.rsplit('/', 1)[-1]} | - | - | pool error |")
    return "\n".join(lines)


def _cell_md(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:160]


def _shown(path: str) -> str:
    """A path as the docs file should name it: relative to the repository when inside it."""
    from scenarios.core.config import REPO_ROOT

    p = Path(path).resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else Path(path).name


def main(argv: list[str] | None = None) -> int:
    from scenarios.core.contract import ExitCode
    from scenarios.core.errors import UsageError

    ap = argparse.ArgumentParser(prog="python -m scenarios.store.matrix_table",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="cells files (cells.json of `cpcheck matrix`)")
    ap.add_argument("--details", action="store_true", help="also when / load / command per cell")
    ap.add_argument("--write", default="", help="write the table (and --details) into this docs "
                    "file, between its generated markers, instead of printing it")
    args = ap.parse_args(argv)
    try:
        missing = [f for f in args.files if not __import__("os").path.exists(f)]
        if missing:
            raise UsageError(f"no such cells file: {missing[0]}")
        cells = matrix_cells.merge(*args.files)
    except UsageError as e:
        print(f"matrix_table: {e}", file=sys.stderr)
        return int(ExitCode.USAGE)
    text = render(cells)
    if args.details:
        text += "\n\n" + details(cells) + "\n\n" + divergences(cells)
    if args.write:
        command = ("python -m scenarios.store.matrix_table " + " ".join(map(_shown, args.files))
                   + (" --details" if args.details else "") + f" --write {_shown(args.write)}")
        write_block(args.write, TABLE, text, command, title="The SGLang release matrix")
    else:
        print(text)
    return int(ExitCode.AGREE)


if __name__ == "__main__":
    sys.exit(main())
