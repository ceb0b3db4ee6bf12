"""Which SGLang protocol agrees under CP: profile x DP attention x layout -> agree / diverge.

Each cell is a Hypothesis hunt (scenarios/campaigns/explore.py `hunt`) over generated Schedules of that
configuration, with the `ci` profile's budget (conftest.py), seed 0, in-process mode. A
divergence is shrunk; its replay file is written to --out (and with --corpus, into
scenarios/corpus/ as `replay-{protocol}-dp{on,off}-{layout}-{digest}.json`, the verdict it must
keep).

    python3 benchmarks/profile_table.py                 # prints the README table
    python3 benchmarks/profile_table.py --corpus        # and stores each divergence
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from reference.api import PROFILES
from scenarios.campaigns.explore import hunt
from scenarios.store.replay import write_replay
from scenarios.sut.reference_executor import Executor

LAYOUTS = ("1x2", "2x2", "2x2x2")
CORPUS = Path(__file__).resolve().parent.parent / "scenarios" / "corpus"


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
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds a rank waits on a peer")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    budget = args.examples or ci_budget()
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
                    h = hunt(ex, "fixed", (layout,), budget, args.seed,
                             protocol=protocol, dp_attention=dp)
                    cell = {"protocol": protocol, "dp_attention": dp, "layout": layout,
                            "examples": h.examples, "seconds": round(time.monotonic() - t0, 1)}
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
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))


if __name__ == "__main__":
    main()
