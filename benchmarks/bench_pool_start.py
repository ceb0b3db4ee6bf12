"""What a RankPool costs to start and close, and what launching torchrun costs in imports.

Every test module and every CLI run that uses the torchrun runner pays one pool start, so this is
the fixed cost to watch when the process plumbing changes. Run it plain:

    python3 benchmarks/bench_pool_start.py --layout 1x2 --runs 5

It prints one line per run and a summary line per figure (min / median), then the time of
``python -m <launcher> --help`` for torchrun's own module and for cpcheck's launcher (the launcher
must not add import time to every pool start). Each figure is wall time and CPU time (user + sys
of every process the pool started, from ``RUSAGE_CHILDREN``): on a shared box the CPU time is the
steadier one to compare.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _children_cpu() -> float:
    """CPU seconds of every reaped descendant (torchrun reaps its workers, we reap torchrun)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _pool_runs(layout: str, runs: int) -> tuple[list[float], list[float], list[float]]:
    from scenarios.runner import RankPool

    starts, closes, cpus = [], [], []
    for i in range(runs):
        pool = RankPool(layout, device="cpu", start_timeout_s=300.0)
        c0 = _children_cpu()
        t0 = time.perf_counter()
        pool.start()
        t1 = time.perf_counter()
        pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=60)
        t2 = time.perf_counter()
        pool.close()
        t3 = time.perf_counter()
        cpu = _children_cpu() - c0
        starts.append(t1 - t0)
        closes.append(t3 - t2)
        cpus.append(cpu)
        print(f"run {i + 1}: start {t1 - t0:6.2f} s  close {t3 - t2:5.2f} s  "
              f"pool CPU {cpu:6.2f} s", flush=True)
    return starts, closes, cpus


def _help_times(module: str, runs: int) -> tuple[list[float], list[float]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    walls, cpus = [], []
    for _ in range(runs):
        c0 = _children_cpu()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", module, "--help"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - c0)
    return walls, cpus


def _line(name: str, xs: list[float]) -> str:
    if not xs:
        return f"{name:<46} (not run)"
    return f"{name:<46} min {min(xs):6.2f} s  median {statistics.median(xs):6.2f} s  (n={len(xs)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default="1x2", help="pool layout (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="pool starts to time (default: %(default)s)")
    p.add_argument("--help-runs", type=int, default=5,
                   help="'--help' launches to time per launcher (default: %(default)s)")
    args = p.parse_args()
    starts, closes, cpus = _pool_runs(args.layout, args.runs)
    summary = [_line(f"RankPool('{args.layout}').start() wall", starts),
               _line(f"RankPool('{args.layout}').close() wall", closes),
               _line(f"RankPool('{args.layout}') start+close CPU", cpus)]
    launchers = ["torch.distributed.run"]
    if importlib.util.find_spec("scenarios.runner.launch") is not None:
        launchers.append("scenarios.runner.launch")
    for module in launchers if args.help_runs > 0 else []:
        walls, hcpus = _help_times(module, args.help_runs)
        summary.append(_line(f"python -m {module} --help wall", walls))
        summary.append(_line(f"python -m {module} --help CPU", hcpus))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
