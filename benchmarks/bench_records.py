"""What one rank's result costs to ship from a torchrun worker: pickled size and time.

Runs the same soak chunks (2x2, fixed seeds, in-process, gated so every run is the same),
measuring the CPU time (all threads) of run + check per decision, then pickles every rank's
result as a worker does (pickle.HIGHEST_PROTOCOL) and unpickles it as the controller does. Works on any commit (a dict result or a RankResult), so before / after compare:

    PYTHONPATH=$PWD python3 benchmarks/bench_records.py [--chunks 10] [--repeat 20]
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import time

from scenarios.campaigns.soak import make_chunk
from scenarios.judge.checker import check
from scenarios.runner.inprocess import run_schedule_inprocess
from scenarios.sut.reference_rank import execute_inprocess


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--layout", default="2x2")
    args = p.parse_args()
    results = []
    cpu = 0.0
    for i in range(args.chunks):
        s = make_chunk(random.Random(i), i, args.layout, "fixed", "memory")
        c0 = time.process_time()  # every thread's CPU: robust to other load on the machine
        out = run_schedule_inprocess(s, execute_inprocess, gated=True, timeout_s=20.0)
        check(s, out)
        cpu += time.process_time() - c0
        results += out
    sizes = []
    dump_us = []
    load_us = []
    decisions = 0
    for r in results:
        blob = pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)
        sizes.append(len(blob))
        d = r["decisions"] if isinstance(r, dict) else r.decisions
        decisions += sum(len(v) for v in d.values())
        t = time.perf_counter()
        for _ in range(args.repeat):
            pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)
        dump_us.append((time.perf_counter() - t) / args.repeat * 1e6)
        t = time.perf_counter()
        for _ in range(args.repeat):
            pickle.loads(blob)
        load_us.append((time.perf_counter() - t) / args.repeat * 1e6)
    kind = type(results[0]).__name__
    print("| result type | rank results | decisions | run+check CPU us/decision | "
          "bytes/rank (median) | bytes/decision | dumps us (median) | loads us (median) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {kind} | {len(results)} | {decisions} | {cpu / max(decisions, 1) * 1e6:.0f} | "
          f"{statistics.median(sizes):.0f} | {sum(sizes) / max(decisions, 1):.1f} | "
          f"{statistics.median(dump_us):.0f} | {statistics.median(load_us):.0f} |")


if __name__ == "__main__":
    main()
