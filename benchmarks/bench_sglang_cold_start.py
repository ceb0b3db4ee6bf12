"""Time to a verdict on SGLang from a cold start, ranks forked from a zygote vs importing SGLang
in every rank (CPCHECK_SGLANG_NO_ZYGOTE=1), side by side.

    python benchmarks/bench_sglang_cold_start.py --runs 2 --layouts 1x2,2x2

Per layout and mode, alternating the modes run by run (the box's load drifts):
- ``cli``: ``cpcheck run <the 0.5.10.post1 corpus file> --sut sglang==0.5.10.post1 --layout L``
  in a fresh process, wall time to its exit (1: diverge, confirmed by a replay) and the CPU
  seconds of it and every process it started;
- the same in this process, split: ``start`` (torchrun until every rank connected; with the
  zygote its SGLang import runs meanwhile), ``warm`` (the executor's first, empty run: SGLang's
  parallel state and first cache, and without the zygote each rank's SGLang import), ``run``
  (the file's Schedule judged and its divergence replayed once, as the CLI does).
Also one SGLang import in one process, the cost the zygote pays once and each rank paid before.
On a shared box compare CPU seconds first; wall time follows the load average (printed).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VERSION = "0.5.10.post1"
CORPUS = REPO / "scenarios" / "corpus" / "sglang" / \
    "replay-sglang-0.5.10.post1-dpattn-1x2-c9b8328630d0.json"
MODES = {"fork": None, "import": "1"}  # the NO_ZYGOTE variable per mode


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _env(mode: str) -> dict[str, str]:
    from scenarios.sut.sglang.executor import NO_ZYGOTE_ENV

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    env.pop(NO_ZYGOTE_ENV, None)
    if MODES[mode]:
        env[NO_ZYGOTE_ENV] = MODES[mode]
    return env


def cli_run(layout: str, mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cpcheck-bench-cold-") as out:
        c0, t0 = _cpu(), time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "scenarios.cli", "run", str(CORPUS), "--sut",
             f"sglang=={VERSION}", "--layout", layout, "--replay-dir", out],
            env=_env(mode), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 1:
        raise SystemExit(f"cpcheck run exited {proc.returncode} (expected 1, diverge):\n"
                         f"{proc.stderr[-2000:]}")
    return {"wall": wall, "cpu": cpu}


def split_run(layout: str, mode: str) -> dict[str, float]:
    """The CLI's path in this process, with the pool's start and first job timed apart."""
    from scenarios.judge.judging import confirm, run_checked
    from scenarios.runner import torchrun_pool
    from scenarios.store.replay import read_replay
    from scenarios.sut.sglang.executor import NO_ZYGOTE_ENV, SglangExecutor

    marks: dict[str, float] = {}
    start, run = torchrun_pool.RankPool.start, torchrun_pool.RankPool.run

    def timed_start(self: torchrun_pool.RankPool) -> torchrun_pool.RankPool:
        t = time.perf_counter()
        try:
            return start(self)
        finally:
            marks["start"] = time.perf_counter() - t

    def timed_run(self: torchrun_pool.RankPool, *a: object, **k: object) -> list:
        t = time.perf_counter()
        try:
            return run(self, *a, **k)
        finally:
            marks.setdefault("warm", time.perf_counter() - t)  # the first job: the warm-up

    os.environ.pop(NO_ZYGOTE_ENV, None)
    if MODES[mode]:
        os.environ[NO_ZYGOTE_ENV] = MODES[mode]
    torchrun_pool.RankPool.start, torchrun_pool.RankPool.run = timed_start, timed_run  # type: ignore[method-assign]
    try:
        s, _ = read_replay(CORPUS)
        s = s.with_(layout=layout, sut=f"sglang=={VERSION}")
        c0, t0 = _cpu() + _self_cpu(), time.perf_counter()
        with SglangExecutor(VERSION, timeout_s=10.0, build=False) as ex:
            ex.pool(layout, True)
            t1 = time.perf_counter()
            _, v = run_checked(ex, s)
            v = confirm(ex, s, v)
            t2 = time.perf_counter()
        cpu = _cpu() + _self_cpu() - c0
    finally:
        torchrun_pool.RankPool.start, torchrun_pool.RankPool.run = start, run  # type: ignore[method-assign]
        os.environ.pop(NO_ZYGOTE_ENV, None)
    if v.status != "diverge":
        raise SystemExit(f"{mode} {layout}: expected diverge, got {v.summary()}")
    return {"start": marks["start"], "warm": marks["warm"], "run": t2 - t1,
            "ready": t1 - t0, "cpu": cpu}


def one_import() -> dict[str, float]:
    from scenarios.sut.sglang import envs

    code = ("import time; t = time.perf_counter(); import torch; "
            "from scenarios.sut.sglang import rank; rank.preload(); "
            "print(time.perf_counter() - t)")
    env = _env("fork")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), envs.pythonpath(VERSION)])
    env.update({"OMP_NUM_THREADS": "1", "SGLANG_LOG_LEVEL": "error", "PYTHONWARNINGS": "ignore"})
    c0 = _cpu()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return {"wall": float(out.strip().splitlines()[-1]), "cpu": _cpu() - c0}


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{min(xs):.1f} / {statistics.median(xs):.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--layouts", default="1x2,2x2")
    p.add_argument("--no-split", action="store_true", help="only the CLI's end-to-end time")
    args = p.parse_args()
    from scenarios.sut.sglang import envs

    m = envs.load_manifest(VERSION)
    if m is None or not m.ok:
        print(f"sglang {VERSION} is not built: python -m scenarios.sut.sglang.envs {VERSION}",
              file=sys.stderr)
        return 2
    layouts = args.layouts.split(",")
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    loads = []
    imp = one_import()
    print(f"one SGLang {VERSION} import (one process, torch included): {imp['wall']:.1f} s "
          f"wall, {imp['cpu']:.1f} s CPU; load {_load()}", flush=True)
    for i in range(args.runs):
        for layout in layouts:
            order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
            for mode in order:
                row = rows.setdefault((layout, mode), {})
                loads.append(os.getloadavg()[0])
                c = cli_run(layout, mode)
                row.setdefault("cli", []).append(c["wall"])
                row.setdefault("cli_cpu", []).append(c["cpu"])
                line = f"run {i + 1} {layout} {mode:<6}: cli {c['wall']:5.1f} s ({c['cpu']:5.1f} s CPU)"
                if not args.no_split:
                    sp = split_run(layout, mode)
                    for k in ("start", "warm", "run", "ready", "cpu"):
                        row.setdefault(k, []).append(sp[k])
                    line += (f"; in process: start {sp['start']:5.1f} warm {sp['warm']:5.1f} "
                             f"run {sp['run']:4.1f} ({sp['cpu']:5.1f} s CPU)")
                print(f"{line}; load {_load()}", flush=True)
    print()
    print(f"time to verdict, cold, sglang {VERSION} (min / median of {args.runs}; s; load "
          f"average {min(loads):.1f}-{max(loads):.1f}):")
    print()
    print("| layout | ranks | cli wall | cli CPU | pool start | warm-up job | run + replay | CPU (in process) |")
    print("|---|---|---|---|---|---|---|---|")
    for (layout, mode), row in rows.items():
        how = "forked from a zygote" if mode == "fork" else "each imports SGLang (before)"
        print(f"| {layout} | {how} | {_fmt(row['cli'])} | {_fmt(row['cli_cpu'])} | "
              f"{_fmt(row.get('start', []))} | {_fmt(row.get('warm', []))} | "
              f"{_fmt(row.get('run', []))} | {_fmt(row.get('cpu', []))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
