"""Time-to-detect for each known-bad variant: median seconds to the first failing Schedule
and the size of the shrunk counterexample, over several seeds (in-process mode), with the
protocol oracle on (as every check runs) and off; then what the oracle costs per check.

    python benchmarks/bench_detect.py --seeds 5 --examples 300
    python benchmarks/bench_detect.py --seeds 5 --examples 200 \
        --json docs/measurements/detect-table.json --write docs/measurements/detect-table.md
    python benchmarks/bench_detect.py --from-json docs/measurements/detect-table.json \
        --write docs/measurements/detect-table.md       # re-render from the raw numbers, no run

`--json` keeps every seed's raw numbers (seconds to the first failure, shrunk size); the
tables are computed from them, so a test can re-render them from the committed file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings

from reference.api import VARIANTS
from scenarios.campaigns.explore import hunt
from scenarios.generate.strategies import for_sut, schedules
from scenarios.judge import checker
from scenarios.judge.oracle import check_oracle
from scenarios.store.doc_tables import write_block
from scenarios.sut.reference_executor import Executor

#: the name of the tables' block in its docs file, and the command that regenerates it
TABLE = "detect-table"
COMMAND = ("python benchmarks/bench_detect.py --from-json docs/measurements/detect-table.json "
           "--write docs/measurements/detect-table.md")


@contextmanager
def oracle(on: bool) -> Iterator[None]:
    if on:
        yield
    else:
        with mock.patch.object(checker, "check_oracle", lambda s, results: []):
            yield


def detect_row(ex: Executor, v: str, layouts: tuple[str, ...], args: argparse.Namespace,
               on: bool) -> dict:
    """One variant, oracle on or off: per seed, seconds to the first failure and shrunk ops
    (None where the budget found nothing)."""
    seeds = []
    with oracle(on):
        for seed in range(args.seeds):
            h = hunt(ex, for_sut("reference", layouts, variant=v), args.examples, seed)
            found = h.found is not None and h.seconds_to_first is not None
            seeds.append({"seed": seed, "seconds": round(h.seconds_to_first, 3) if found else None,
                          "ops": h.steps if found else None})
    return {"variant": v, "oracle": on, "seeds": seeds}


def row_text(row: dict) -> str:
    firsts = [s["seconds"] for s in row["seeds"] if s["seconds"] is not None]
    sizes = [s["ops"] for s in row["seeds"] if s["seconds"] is not None]
    med = f"{statistics.median(firsts):.2f}" if firsts else "-"
    ms = f"{statistics.median(sizes):.0f}" if sizes else "-"
    return (f"| {row['variant']} | {'on' if row['oracle'] else 'off'} | "
            f"{len(firsts)}/{len(row['seeds'])} | {med} | {ms} | {max(sizes, default='-')} |")


DETECT_HEAD = ("| variant | oracle | found | median s to first failure | median shrunk ops | "
               "max shrunk ops |\n|---|---|---|---|---|---|")


def cost_table(cost: dict) -> str:
    lines = [f"oracle cost over {cost['schedules']} generated schedules "
             f"({', '.join(cost['layouts'])}), median {cost['median_decisions']:.0f} decisions "
             "per run:", "", "| step | median ms | mean ms | share of one example |",
             "|---|---|---|---|"]
    total = sum(sum(xs) for xs in cost["seconds"].values())
    for name, xs in cost["seconds"].items():
        lines.append(f"| {name} | {statistics.median(xs) * 1000:.2f} | "
                     f"{statistics.mean(xs) * 1000:.2f} | {sum(xs) / total:.1%} |")
    return "\n".join(lines)


def render_section(data: dict) -> str:
    """What the docs file holds between its markers, computed from the raw numbers only."""
    m = data["meta"]
    lines = [f"Measured {m['date']} at commit {m['commit']} ({m['machine']}, load average "
             f"{m['loadavg_start']} at the start, {m['loadavg_end']} at the end): layouts "
             f"{', '.join(m['layouts'])}; {m['seeds']} seeds; budget {m['examples']} schedules; "
             "in-process mode.", "", DETECT_HEAD]
    lines += [row_text(r) for r in data["rows"]]
    if data.get("cost"):
        lines += ["", cost_table(data["cost"])]
    return "\n".join(lines)


def oracle_cost(ex: Executor, layouts: tuple[str, ...], n: int) -> dict:
    runs, checks, oracles, decisions = [], [], [], []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(schedules(layouts=layouts))
    def one(s) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        results = ex.run(s)
        t1 = time.perf_counter()
        with oracle(False):
            checker.check(s, results)
        t2 = time.perf_counter()
        check_oracle(s, results)
        t3 = time.perf_counter()
        runs.append(t1 - t0)
        checks.append(t2 - t1)
        oracles.append(t3 - t2)
        decisions.append(sum(r.decision_count() for r in results))

    one()
    cost = {"schedules": len(runs), "layouts": list(layouts),
            "median_decisions": statistics.median(decisions),
            "seconds": {"run the schedule": runs, "six cross-rank invariants": checks,
                        "protocol oracle": oracles}}
    print("\n" + cost_table(cost))
    return cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--layout", action="append", default=None)
    ap.add_argument("--variant", action="append", default=None)
    ap.add_argument("--cost-examples", type=int, default=200,
                    help="schedules timed for the oracle's cost (0: skip)")
    ap.add_argument("--json", default="", help="also write every seed's raw numbers here")
    ap.add_argument("--write", default="", help="write the tables into this docs file "
                    "(between its generated markers)")
    ap.add_argument("--from-json", default="", help="render an earlier --json run, no run")
    ap.add_argument("--machine", default="", help="words for the docs file: which host ran it")
    args = ap.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    if args.write:
        write_block(args.write, TABLE, render_section(data), COMMAND,
                    title="Time to detect each known-bad variant (generated)")
    elif args.from_json:
        print(render_section(data))


def measure(args: argparse.Namespace) -> dict:
    logging.disable(logging.WARNING)
    layouts = tuple(args.layout or ["1x2", "2x2"])
    variants = args.variant or [v for v in VARIANTS if v != "fixed"]
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": _commit(),
            "machine": args.machine or f"{os.cpu_count()} cores, CPU torch",
            "loadavg_start": round(os.getloadavg()[0], 1), "layouts": list(layouts),
            "seeds": args.seeds, "examples": args.examples}
    print(f"layouts {', '.join(layouts)}; {args.seeds} seeds; budget {args.examples} schedules\n")
    print(DETECT_HEAD)
    rows, cost = [], None
    with Executor("inprocess", timeout_s=1.5) as ex:
        for v in variants:
            for on in (True, False):
                rows.append(detect_row(ex, v, layouts, args, on))
                print(row_text(rows[-1]), flush=True)
        if args.cost_examples:
            cost = oracle_cost(ex, layouts, args.cost_examples)
    meta["loadavg_end"] = round(os.getloadavg()[0], 1)
    return {"meta": meta, "rows": rows, "cost": cost}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    main()
