"""Which SGLang protocol agrees under CP: profile x DP attention x layout -> agree / diverge.

Each cell is a Hypothesis hunt (scenarios/campaigns/explore.py `hunt`) over generated Schedules of that
configuration, with the `ci` profile's budget (conftest.py), seed 0, in-process mode. A
divergence is shrunk; its replay file is written to --out (and with --corpus, into
scenarios/corpus/ as `replay-{protocol}-dp{on,off}-{layout}-{digest}.json`, the verdict it must
keep).

    python3 benchmarks/profile_table.py                 # prints the table
    python3 benchmarks/profile_table.py --corpus        # and stores each divergence
    python3 benchmarks/profile_table.py --json docs/measurements/profile-table.json \
        --write docs/measurements/profile-table.md      # the committed table and its cells
    python3 benchmarks/profile_table.py --from-json docs/measurements/profile-table.json \
        --write docs/measurements/profile-table.md      # re-render from the cells, no run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from reference.api import PROFILES
from scenarios.store.doc_tables import write_block

LAYOUTS = ("1x2", "2x2", "2x2x2")
CORPUS = Path(__file__).resolve().parent.parent / "scenarios" / "corpus"
#: the name of the table's block in its docs file, and the command that regenerates it
TABLE = "profile-table"
COMMAND = ("python3 benchmarks/profile_table.py --from-json docs/measurements/profile-table.json "
           "--write docs/measurements/profile-table.md")


def cell_text(c: dict) -> str:
    if c["verdict"] == "agree":
        return "agree"
    return f"diverge: {c['invariant']}, {c['ops']} ops"


def render(cells: list[dict]) -> str:
    """The table (protocol x DP attention rows, one column per layout) from the cells."""
    layouts = list(dict.fromkeys(c["layout"] for c in cells))
    rows: dict[tuple[str, bool], dict[str, str]] = {}
    for c in cells:
        rows.setdefault((c["protocol"], c["dp_attention"]), {})[c["layout"]] = cell_text(c)
    lines = ["| protocol | dp attention | " + " | ".join(layouts) + " |",
             "|---|---|" + "---|" * len(layouts)]
    for (protocol, dp), row in rows.items():
        lines.append(f"| {protocol} | {'on' if dp else 'off'} | "
                     + " | ".join(row.get(lay, "not run") for lay in layouts) + " |")
    return "\n".join(lines)


def render_section(cells: list[dict]) -> str:
    """What the docs file holds between its markers: how it was measured, then the table."""
    meta = cells[0] if cells else {}
    head = (f"Measured {meta.get('date', '?')} at commit {meta.get('commit', '?')}: "
            f"in-process mode, memory backend, seed {meta.get('seed', '?')}, "
            f"{meta.get('budget', '?')} generated Schedules per cell; "
            f"{sum(c.get('seconds', 0) for c in cells):.0f} s of cells "
            f"(load average {meta.get('loadavg', '?')} at the start).")
    return head + "\n\n" + render(cells)


def ci_budget() -> int:
    import sys

    from hypothesis import settings

    sys.path.insert(0, str(CORPUS.parents[1]))  # conftest.py sits at the repo root
    import conftest  # noqa: F401  (registers the Hypothesis profiles dev, ci, nightly)

    return settings.get_profile("ci").max_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=None, help="default: the ci profile's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocol", action="append", help="repeatable; default all")
    ap.add_argument("--layout", action="append", help=f"repeatable; default {' '.join(LAYOUTS)}")
    ap.add_argument("--out", default="cpcheck-out/profile-table")
    ap.add_argument("--corpus", action="store_true", help="copy each divergence into the corpus")
    ap.add_argument("--json", default="", help="also write the cells here")
    ap.add_argument("--write", default="", help="write the table into this docs file "
                    "(between its generated markers)")
    ap.add_argument("--from-json", default="", help="render the cells of an earlier --json "
                    "run instead of measuring")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds a rank waits on a peer")
    args = ap.parse_args()
    if args.from_json:
        cells = json.loads(Path(args.from_json).read_text())
        print(render(cells))
        if args.write:
            write_block(args.write, TABLE, render_section(cells), COMMAND,
                        title="Which protocol agrees under CP (generated)")
        return
    logging.disable(logging.WARNING)
    from scenarios.campaigns.explore import hunt
    from scenarios.generate.strategies import for_sut
    from scenarios.store.replay import write_replay
    from scenarios.sut.reference_executor import Executor

    budget = args.examples or ci_budget()
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": _commit(),
            "seed": args.seed, "budget": budget, "loadavg": round(os.getloadavg()[0], 1)}
    protocols = args.protocol or list(PROFILES)
    layouts = tuple(args.layout or LAYOUTS)
    print(f"in-process mode; budget {budget} generated schedules per cell (ci profile), "
          f"seed {args.seed}, memory backend\n")
    print("| protocol | dp attention | " + " | ".join(layouts) + " |")
    print("|---|---|" + "---|" * len(layouts))
    cells = []
    with Executor("inprocess", timeout_s=args.timeout) as ex:
        for protocol in protocols:
            for dp in (True, False):
                row = []
                for layout in layouts:
                    t0 = time.monotonic()
                    h = hunt(ex, for_sut("reference", (layout,), protocol=protocol,
                                         dp_attention=dp), budget, args.seed)
                    cell = {"protocol": protocol, "dp_attention": dp, "layout": layout,
                            "examples": h.examples, "seconds": round(time.monotonic() - t0, 1),
                            **(meta if not cells else {})}
                    if h.found is None or h.verdict is None:
                        row.append("agree")
                        cell["verdict"] = "agree"
                    else:
                        path = write_replay(h.found, h.verdict, args.out, "inprocess")
                        cell.update(verdict="diverge", invariant=h.verdict.invariant,
                                    ops=h.steps, replay=str(path),
                                    message=h.verdict.message)
                        if args.corpus:
                            name = (f"replay-{protocol}-dp{'on' if dp else 'off'}-{layout}-"
                                    f"{h.found.digest()}.json")
                            shutil.copy(path, CORPUS / name)
                            cell["corpus"] = name
                        row.append(f"diverge: {h.verdict.invariant}, {h.steps} ops")
                    cells.append(cell)
                print(f"| {protocol} | {'on' if dp else 'off'} | " + " | ".join(row) + " |",
                      flush=True)
    print()
    for c in cells:
        if c["verdict"] == "diverge":
            print(f"- {c['protocol']} dp {'on' if c['dp_attention'] else 'off'} {c['layout']}: "
                  f"[{c['invariant']}] {c['message'][:160]}"
                  + (f" (corpus: {c['corpus']})" if "corpus" in c else ""))
    for c in cells:
        c.pop("replay", None)  # a path on the measuring machine
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1) + "\n")
    if args.write:
        write_block(args.write, TABLE, render_section(cells), COMMAND,
                    title="Which protocol agrees under CP (generated)")


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=CORPUS.parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    main()
