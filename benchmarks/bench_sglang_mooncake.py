"""SGLang as the SUT on its MooncakeStore vs its file backend: the same Schedules on both, the
verdict of each side by side, and decisions per second per backend.

    python benchmarks/bench_sglang_mooncake.py [--release 0.5.11] [--layout 1x2 --layout 2x2]
        [--dp on --dp off] [--schedules 6] [--seed 7]

Per (layout, DP attention): the corpus Schedules of that layout (scenarios/corpus/ and
corpus/sglang/), the catalog's write_acks, then `--schedules` generated ones. Each Schedule
runs on the file backend, then on Mooncake, in the same warm pool, so both see the same load.
The Mooncake master is started here and stopped on exit. Needs the release's environment
(python -m scenarios.sut.sglang.envs RELEASE) and mooncake-transfer-engine(-non-cuda).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generated(n: int, layout: str, seed: int) -> list:
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    from scenarios.generate.strategies import schedules

    got: list = []
    if n <= 0:
        return got

    def take(s) -> bool:  # noqa: ANN001
        got.append(s.with_(cache={**s.cache.model_dump(), "mla": False}))
        return False

    try:
        find(schedules(layouts=(layout,)), take, random=random.Random(seed),
             settings=settings(max_examples=n, database=None, deadline=None,
                               phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        pass
    return got[:n]


def verdict_word(v) -> str:  # noqa: ANN001
    return "agree" if v.ok else f"diverge [{v.invariant}]"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", default="0.5.11")
    ap.add_argument("--layout", action="append")
    ap.add_argument("--dp", action="append", choices=["on", "off"])
    ap.add_argument("--schedules", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()

    from scenarios.campaigns.matrix import corpus_for
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.checker import check
    from scenarios.sut.sglang.executor import SglangExecutor, annotate

    sut = f"sglang=={args.release}"
    totals = {"file": [0, 0.0], "mooncake": [0, 0.0]}
    mismatches = 0
    notes: list[str] = []
    with SglangExecutor(args.release, timeout_s=args.timeout, build=False,
                        log=lambda m: print(m, file=sys.stderr)) as ex:
        for layout in args.layout or ["1x2"]:
            for dp_word in args.dp or ["on"]:
                dp = dp_word == "on"
                scheds = [(n, s) for n, s in corpus_for(layout)]
                scheds.append(("write_acks", load_scenario("write_acks").with_(layout=layout)))
                scheds += [(f"generated #{i}", s) for i, s in
                           enumerate(generated(args.schedules, layout, args.seed))]
                ex.run(scheds[-1][1].with_(sut=sut, backend="file"), dp)  # pool warm
                ex.run(scheds[-1][1].with_(sut=sut, backend="mooncake"), dp)  # master, client
                print(f"\n## sglang {args.release}, layout {layout}, DP attention {dp_word}")
                print("| Schedule | ops | file | mooncake | decisions file / mooncake |")
                print("|---|---|---|---|---|")
                for name, s in scheds:
                    row = []
                    for backend in ("file", "mooncake"):
                        one = s.with_(sut=sut, dp_attention=dp, backend=backend)
                        t = time.monotonic()
                        try:
                            res = ex.run(one, dp)
                        except Exception as e:  # one line per failed run; the table goes on
                            row.append((f"error: {type(e).__name__}", 0, str(e)[:300]))
                            continue
                        wall = time.monotonic() - t
                        n = sum(len(v) for r in res for v in r.decisions.values())
                        totals[backend][0] += n
                        totals[backend][1] += wall
                        v = annotate(check(one, res), dp, backend)
                        row.append((verdict_word(v), n, v.summary()[:300]))
                    mismatches += row[0][0] != row[1][0]
                    print(f"| {name} | {len(s.ops)} | {row[0][0]} | {row[1][0]} | "
                          f"{row[0][1]} / {row[1][1]} |", flush=True)
                    if row[0][0] != row[1][0]:  # say why, under the table row's name
                        for backend, r in zip(("file", "mooncake"), row, strict=True):
                            if r[0] != "agree":
                                notes.append(f"{name} on {backend}: {r[-1]}")
    print("\n| backend | decisions/s | decisions | wall s |")
    print("|---|---|---|---|")
    for backend, (n, wall) in totals.items():
        print(f"| {backend} | {n / wall if wall else 0:.1f} | {n} | {wall:.1f} |")
    print(f"\nSchedules whose verdict differs between the backends: {mismatches}")
    for line in notes:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
