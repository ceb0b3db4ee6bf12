"""SGLang as the SUT: time to detect the pre-fix divergence from a warm pool, and decisions per
second on SGLang vs the reference on the same Schedules.

    python benchmarks/bench_sglang.py [--pre 0.5.10.post1] [--post 0.5.11] [--seeds 5]
        [--seed0 0] [--examples 200] [--shrink-s 60] [--schedules 20] [--detect-only]
    (--seeds 0: decisions per second only)

Per seed: seconds and Schedules to the first divergence, seconds per run before it (and how
much of that the ranks spent building and shutting down SGLang's cache), the shrink, the replay
confirmation (k/3) and the load average (the box is shared: read every time with it).

Needs the two environments (python -m scenarios.sut.sglang.envs 0.5.10.post1 0.5.11).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample


def warm(ex, layout: str = "1x2") -> float:  # noqa: ANN001
    from scenarios.generate.catalog import load_scenario

    t = time.monotonic()
    ex.run(load_scenario("write_acks").with_(layout=layout))
    return time.monotonic() - t


class Timed:
    """The executor, with each run's wall time and where its ranks spent it recorded."""

    def __init__(self, ex) -> None:  # noqa: ANN001
        self.ex = ex
        self.rows: list[dict] = []

    def __getattr__(self, name: str):  # noqa: ANN204  (sut, mode, judge, ...: the executor's)
        return getattr(self.ex, name)

    def run(self, s, dp=None, **kw):  # noqa: ANN001, ANN003, ANN201
        t = time.monotonic()
        res = self.ex.run(s, dp, **kw)
        self.rows.append({"wall": time.monotonic() - t,
                          "rank": max(r.wall_s for r in res),
                          "build": max(r.phase_s.get("build", 0.0) for r in res),
                          "shutdown": max(r.phase_s.get("shutdown", 0.0) for r in res),
                          "ops": len(s.ops)})
        return res


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def detect(version: str, seeds: list[int], examples: int, shrink_s: float) -> list[dict]:
    from scenarios.campaigns.explore import hunt
    from scenarios.generate.strategies import for_sut
    from scenarios.sut.sglang.executor import SglangExecutor

    out = []
    with SglangExecutor(version, timeout_s=20, build=False) as ex:
        print(f"pool start + first run: {warm(ex):.1f} s; load average {_load()}")
        print("| seed | s to first divergence | Schedules to it | s per run (rank: run, build, "
              "shutdown) | shrink s | shrunk ops | replay | total s | load |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        for seed in seeds:
            timed = Timed(ex)
            h = hunt(timed, for_sut(f"sglang=={version}", ("1x2",)), examples, seed,
                     shrink_s=shrink_s, replays=3)
            pre = timed.rows[:h.first_n or len(timed.rows)]
            row = {"seed": seed, "first_s": h.seconds_to_first, "first_n": h.first_n,
                   "run_s": _mean([r["wall"] for r in pre]),
                   "rank_s": _mean([r["rank"] for r in pre]),
                   "build_s": _mean([r["build"] for r in pre]),
                   "shutdown_s": _mean([r["shutdown"] for r in pre]),
                   "shrink_s": h.seconds_shrinking, "ops": h.steps,
                   "replay": f"{h.reproduced}/{h.replays}", "total_s": h.seconds_total}
            out.append(row)
            first = f"{row['first_s']:.1f}" if row["first_s"] is not None else "not found"
            shrink = f"{row['shrink_s']:.1f}" if row["shrink_s"] is not None else "-"
            print(f"| {seed} | {first} | {row['first_n']} | {row['run_s']:.2f} "
                  f"({row['rank_s']:.2f}, {row['build_s']:.2f}, {row['shutdown_s']:.2f}) | "
                  f"{shrink} | {row['ops']} | {row['replay']} | {row['total_s']:.1f} | "
                  f"{_load()} |", flush=True)
    return out


def same_schedules(n: int, layout: str) -> list:
    import random

    from scenarios.generate.strategies import schedules

    got: list = []

    def take(s) -> bool:  # noqa: ANN001
        got.append(s.with_(cache={**s.cache.model_dump(), "mla": False}))
        return False

    try:
        find(schedules(layouts=(layout,)), take, random=random.Random(7),
             settings=settings(max_examples=n, database=None, deadline=None,
                               phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        pass
    return got[:n]


def rate(run, scheds: list) -> tuple[float, int, float]:  # noqa: ANN001
    t = time.monotonic()
    decisions = 0
    for s in scheds:
        res = run(s)
        decisions += sum(r.decision_count() for r in res)
    wall = time.monotonic() - t
    return decisions / wall, decisions, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pre", default="0.5.10.post1")
    ap.add_argument("--post", default="0.5.11")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--examples", type=int, default=200, help="generated budget per seed")
    ap.add_argument("--shrink-s", type=float, default=60.0, help="shrinking budget per seed")
    ap.add_argument("--schedules", type=int, default=20)
    ap.add_argument("--layout", default="1x2")
    ap.add_argument("--detect-only", action="store_true", help="skip decisions per second")
    args = ap.parse_args()

    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    if seeds:
        time_to_detect(args, seeds)
    if not args.detect_only:
        rates(args)


def time_to_detect(args: argparse.Namespace, seeds: list[int]) -> None:
    print(f"## time to detect: sglang {args.pre}, 1x2, DP attention, warm pool, seeds {seeds}")
    found = detect(args.pre, seeds, args.examples, args.shrink_s)
    firsts = [r["first_s"] for r in found if r["first_s"] is not None]
    ns = [r["first_n"] for r in found if r["first_n"] is not None]
    print(f"found {len(firsts)}/{len(found)}; s to first divergence: median "
          f"{statistics.median(firsts) if firsts else '-'}, max {max(firsts) if firsts else '-'}; "
          f"Schedules to it: median {statistics.median(ns) if ns else '-'}, max "
          f"{max(ns) if ns else '-'}; shrunk ops median "
          f"{statistics.median([r['ops'] for r in found if r['ops']]) if firsts else '-'}")


def rates(args: argparse.Namespace) -> None:
    from scenarios.sut.reference_executor import Executor
    from scenarios.sut.sglang.executor import SglangExecutor

    scheds = same_schedules(args.schedules, args.layout)
    print(f"\n## decisions per second, {len(scheds)} generated Schedules, layout {args.layout}")
    print("| system under test | decisions/s | decisions | wall s |")
    print("|---|---|---|---|")
    with SglangExecutor(args.post, timeout_s=20, build=False) as ex:
        warm(ex, args.layout)
        r = rate(lambda s: ex.run(s.with_(sut=f"sglang=={args.post}"), True), scheds)
        print(f"| sglang {args.post} (torchrun pool, warm) | {r[0]:.0f} | {r[1]} | {r[2]:.1f} |")
    with Executor("torchrun", timeout_s=20) as ex:
        warm(ex, args.layout)
        r = rate(ex.run, scheds)
        print(f"| reference (torchrun pool, warm) | {r[0]:.0f} | {r[1]} | {r[2]:.1f} |")
    with Executor("inprocess", timeout_s=20) as ex:
        r = rate(ex.run, scheds)
        print(f"| reference (in-process) | {r[0]:.0f} | {r[1]} | {r[2]:.1f} |")


if __name__ == "__main__":
    main()
