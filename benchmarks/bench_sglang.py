"""SGLang as the SUT: time to detect the pre-fix divergence from a warm pool, and decisions per
second on SGLang vs the reference on the same Schedules.

    python benchmarks/bench_sglang.py [--pre 0.5.10.post1] [--post 0.5.11] [--seeds 3]
        [--schedules 20]

Needs the two environments (python -m scenarios.sglang.envs 0.5.10.post1 0.5.11).
"""

from __future__ import annotations

import argparse
import statistics
import time

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample


def warm(ex, layout: str = "1x2") -> float:  # noqa: ANN001
    from scenarios.catalog import load_scenario

    t = time.monotonic()
    ex.run(load_scenario("write_acks").with_(layout=layout))
    return time.monotonic() - t


def detect(version: str, seeds: int) -> list[tuple[float | None, int]]:
    from scenarios.sglang.executor import SglangExecutor
    from scenarios.sglang.hunting import hunt

    out = []
    with SglangExecutor(version, timeout_s=20, build=False) as ex:
        print(f"pool start + first run: {warm(ex):.1f} s")
        for seed in range(seeds):
            h = hunt(version, True, ("1x2",), 200, seed, ex=ex)
            out.append((h["first_s"], len(h["found"].ops) if h["found"] else 0))
            print(f"  seed {seed}: first divergence {h['first_s']} s, shrunk "
                  f"{out[-1][1]} ops, {h['examples']} schedules, {h['total_s']:.1f} s total")
    return out


def same_schedules(n: int, layout: str) -> list:
    import random

    from scenarios.strategies import schedules

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
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--schedules", type=int, default=20)
    ap.add_argument("--layout", default="1x2")
    args = ap.parse_args()

    print(f"## time to detect: sglang {args.pre}, 1x2, DP attention, warm pool")
    found = detect(args.pre, args.seeds)
    firsts = [f for f, _ in found if f is not None]
    print(f"found {len(firsts)}/{len(found)}; median s to first divergence "
          f"{statistics.median(firsts) if firsts else '-'}; median shrunk ops "
          f"{statistics.median([n for _, n in found if n]) if firsts else '-'}")

    from scenarios.executor import Executor
    from scenarios.sglang.executor import SglangExecutor

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
