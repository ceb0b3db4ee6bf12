"""Decisions/s of one layout as 1 torchrun agent vs N agents joined by one rendezvous, side by side.

The same gated soak chunks (fixed seeds, so both sides run identical work) on a pool of one
torchrun agent and on a pool spread over `--nnodes` agents on this machine (127.0.0.1, the
extra agents started as `cpcheck agent` processes). Pool start is timed apart; the rate counts
only the runs. On a machine with fewer cores than ranks the numbers measure the scheduler as
much as cpcheck: say which machine and load they came from.

    PYTHONPATH=$PWD python3 benchmarks/bench_multihost.py [--layout 4x4] [--nnodes 2] [--chunks 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

from scenarios.campaigns.soak import make_chunk
from scenarios.core.layout import Layout
from scenarios.judge.checker import check
from scenarios.runner.torchrun_pool import RankPool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def measure(layout: str, nnodes: int, chunks: int, timeout_s: float) -> tuple[float, float, int]:
    """(pool start s, run s, decisions) for `chunks` gated chunks on one pool."""
    world = Layout.parse(layout).world_size
    agents: list[subprocess.Popen] = []
    kw: dict = {}
    if nnodes > 1:
        endpoint = f"127.0.0.1:{_free_port()}"
        kw = {"nnodes": nnodes, "rdzv_endpoint": endpoint}
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        agents = [subprocess.Popen([sys.executable, "-m", "scenarios.cli", "agent", "--nnodes",
                                    str(nnodes), "--rdzv-endpoint", endpoint, "--once"],
                                   env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for _ in range(nnodes - 1)]
    root = tempfile.mkdtemp(prefix="bench-mh-")
    pool = RankPool(layout, device="cpu", collective_timeout_s=timeout_s, max_ranks=world,
                    start_timeout_s=300, env={"OMP_NUM_THREADS": "1"}, **kw)
    try:
        t0 = time.perf_counter()
        pool.start()
        start_s = time.perf_counter() - t0
        decisions = 0
        t0 = time.perf_counter()
        for i in range(chunks):
            s = make_chunk(random.Random(i), i, layout, "fixed", "memory")
            payload = {"schedule": s.model_dump_json(), "run_id": f"r{uuid.uuid4().hex[:10]}",
                       "gated": True, "storage_root": root, "mooncake_master": "",
                       "collective_timeout_s": timeout_s}
            results = pool.run("scenarios.sut.reference_jobs:run_schedule", payload,
                               timeout_s=timeout_s * 6 + 30)
            v = check(s, results)
            assert v.status == "agree", v.summary()
            decisions += int(v.stats.get("decisions", 0))
        return start_s, time.perf_counter() - t0, decisions
    finally:
        pool.close()
        for a in agents:
            _kill_tree(a.pid)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default="4x4")
    p.add_argument("--nnodes", type=int, default=2)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    print(f"layout {args.layout}, {args.chunks} gated chunks, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| agents | pool start s | run s | decisions | decisions/s |")
    print("|---|---|---|---|---|")
    for nnodes in (1, args.nnodes):
        start_s, run_s, dec = measure(args.layout, nnodes, args.chunks, args.timeout)
        print(f"| {nnodes} | {start_s:.1f} | {run_s:.1f} | {dec} | {dec / run_s:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
