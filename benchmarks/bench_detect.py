"""Time-to-detect for each known-bad variant: median seconds to the first failing Schedule
and the size of the shrunk counterexample, over several seeds (in-process mode).

    python benchmarks/bench_detect.py --seeds 5 --examples 300
"""

from __future__ import annotations

import argparse
import logging
import statistics

from reference.api import VARIANTS
from scenarios.executor import Executor
from scenarios.explore import hunt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--layout", action="append", default=None)
    ap.add_argument("--variant", action="append", default=None)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    layouts = tuple(args.layout or ["1x2", "2x2"])
    variants = args.variant or [v for v in VARIANTS if v != "fixed"]
    print(f"layouts {', '.join(layouts)}; {args.seeds} seeds; budget {args.examples} schedules\n")
    print("| variant | found | median s to first failure | median shrunk ops | max shrunk ops |")
    print("|---|---|---|---|---|")
    with Executor("inprocess", timeout_s=1.5) as ex:
        for v in variants:
            firsts, sizes = [], []
            for seed in range(args.seeds):
                h = hunt(ex, v, layouts, args.examples, seed)
                if h.found is not None and h.seconds_to_first is not None:
                    firsts.append(h.seconds_to_first)
                    sizes.append(h.steps)
            med = f"{statistics.median(firsts):.2f}" if firsts else "-"
            ms = f"{statistics.median(sizes):.0f}" if sizes else "-"
            print(f"| {v} | {len(firsts)}/{args.seeds} | {med} | {ms} | {max(sizes, default='-')} |",
                  flush=True)


if __name__ == "__main__":
    main()
