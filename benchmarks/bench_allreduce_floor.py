"""The gloo all-reduce floor: p50 / p90 of a one-int64 all-reduce at N ranks.

Every cross-rank decision the harness checks costs at least one such all-reduce, so this is
the ceiling against which decisions/s should be read. Run it plain; it starts its own ranks:

    python3 benchmarks/bench_allreduce_floor.py --ranks 2 4 8 --iters 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _worker(iters: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.zeros(1, dtype=torch.int64)
    for _ in range(50):
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    lat = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        lat.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        lat.sort()
        p50 = statistics.median(lat) * 1e6
        p90 = lat[int(0.9 * len(lat))] * 1e6
        print(f"RESULT ranks={dist.get_world_size()} p50_us={p50:.0f} p90_us={p90:.0f} "
              f"floor_per_s={1e6 / p50:.0f}", flush=True)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a.iters)
        return 0
    print("| ranks | p50 us | p90 us | all-reduces/s at p50 |\n|---|---|---|---|")
    for n in a.ranks:
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
             __file__, "--worker", "--iters", str(a.iters)],
            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
        if line is None:
            print(f"| {n} | failed: {out.stderr.strip().splitlines()[-1:]} | | |")
            continue
        f = dict(kv.split("=") for kv in line.split()[1:])
        print(f"| {n} | {f['p50_us']} | {f['p90_us']} | {f['floor_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
