"""Time-to-detect for each known-bad variant: median seconds to the first failing Schedule
and the size of the shrunk counterexample, over several seeds (in-process mode), with the
protocol oracle on (as every check runs) and off; then what the oracle costs per check.

    python benchmarks/bench_detect.py --seeds 5 --examples 300
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from hypothesis import HealthCheck, given, settings

from reference.api import VARIANTS
from scenarios.campaigns.explore import hunt
from scenarios.generate.strategies import schedules
from scenarios.judge import checker
from scenarios.judge.oracle import check_oracle
from scenarios.sut.reference_executor import Executor


@contextmanager
def oracle(on: bool) -> Iterator[None]:
    if on:
        yield
    else:
        with mock.patch.object(checker, "check_oracle", lambda s, results: []):
            yield


def detect_row(ex: Executor, v: str, layouts: tuple[str, ...], args: argparse.Namespace,
               on: bool) -> tuple[str, str, str, str]:
    firsts, sizes = [], []
    with oracle(on):
        for seed in range(args.seeds):
            h = hunt(ex, v, layouts, args.examples, seed)
            if h.found is not None and h.seconds_to_first is not None:
                firsts.append(h.seconds_to_first)
                sizes.append(h.steps)
    med = f"{statistics.median(firsts):.2f}" if firsts else "-"
    ms = f"{statistics.median(sizes):.0f}" if sizes else "-"
    return f"{len(firsts)}/{args.seeds}", med, ms, str(max(sizes, default="-"))


def oracle_cost(ex: Executor, layouts: tuple[str, ...], n: int) -> None:
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
    ms = 1000.0
    print(f"\noracle cost over {len(runs)} generated schedules ({', '.join(layouts)}), "
          f"median {statistics.median(decisions):.0f} decisions per run:\n")
    print("| step | median ms | mean ms | share of one example |")
    print("|---|---|---|---|")
    total = sum(runs) + sum(checks) + sum(oracles)
    for name, xs in (("run the schedule", runs), ("six cross-rank invariants", checks),
                     ("protocol oracle", oracles)):
        print(f"| {name} | {statistics.median(xs) * ms:.2f} | {statistics.mean(xs) * ms:.2f} | "
              f"{sum(xs) / total:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--layout", action="append", default=None)
    ap.add_argument("--variant", action="append", default=None)
    ap.add_argument("--cost-examples", type=int, default=200,
                    help="schedules timed for the oracle's cost (0: skip)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    layouts = tuple(args.layout or ["1x2", "2x2"])
    variants = args.variant or [v for v in VARIANTS if v != "fixed"]
    print(f"layouts {', '.join(layouts)}; {args.seeds} seeds; budget {args.examples} schedules\n")
    print("| variant | oracle | found | median s to first failure | median shrunk ops | "
          "max shrunk ops |")
    print("|---|---|---|---|---|---|")
    with Executor("inprocess", timeout_s=1.5) as ex:
        for v in variants:
            for on in (True, False):
                found, med, ms, mx = detect_row(ex, v, layouts, args, on)
                print(f"| {v} | {'on' if on else 'off'} | {found} | {med} | {ms} | {mx} |",
                      flush=True)
        if args.cost_examples:
            oracle_cost(ex, layouts, args.cost_examples)


if __name__ == "__main__":
    main()
