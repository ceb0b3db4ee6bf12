"""`cpcheck report merge` of N one-hour shard reports: how long the merge takes (goal: 16 in < 10 s).

Synthetic reports, shaped like a real one-hour in-process soak at `--runs-per-s` (5 on a loaded
2-core box): one timeline point and one host_used entry per run, the nemesis's fault events up
to its cap (20,000), coverage counts, a few unknown runs; the last shard diverged and kept its
replay file. Each is written with the soak's own writer (so the file is what a soak leaves),
then the merge is timed end to end (reading, folding, report.json, every plot, copying files),
as wall time and as this process's CPU time (the merge is one thread: its CPU time is what it
takes on an idle machine; wall time on a shared box is that plus waiting for a core):

    PYTHONPATH=$PWD python3 benchmarks/bench_report_merge.py [--shards 16] [--hours 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from scenarios.judge.coverage import PREFETCH_CLASSES
from scenarios.nemesis.faults import KINDS, MAX_EVENTS
from scenarios.store.report import SOAK_REPORT_SCHEMA, atomic_write_text


def synthetic_report(index: int, count: int, hours: float, runs_per_s: float,
                     rng: random.Random, diverged: bool) -> dict:
    seconds = hours * 3600.0
    runs = int(seconds * runs_per_s)
    timeline, decisions = [], 0
    for k in range(1, runs + 1):
        n = rng.randint(300, 900)
        decisions += n
        t = k / runs_per_s
        timeline.append({"t": round(t, 3), "runs": k, "decisions": decisions,
                         "decisions_per_s": round(decisions / t, 1),
                         "run_decisions_per_s": round(n * runs_per_s, 1),
                         "faults_in_run": rng.randint(0, 3)})
    events = [{"t": round(rng.uniform(0, seconds), 3), "kind": rng.choice(KINDS),
               "rank": rng.randrange(4), "detail": "window 0.095-0.279 s of the run"}
              for _ in range(MAX_EVENTS)]
    events.sort(key=lambda e: e["t"])
    faults = {k: sum(e["kind"] == k for e in events) for k in KINDS}
    status = "diverge" if diverged else "agree"
    verdict = {"ok": not diverged, "status": status,
               "invariant": "decisions" if diverged else None,
               "message": "channel 'scheduler' decision #11: ..." if diverged else "all runs agree",
               "diagnosis": None, "failures": [], "stats": {"confirmed_by_replay": diverged}}
    cov = {"prefetch": {c: rng.randint(1000, 9000) for c in PREFETCH_CLASSES},
           "write_acks": {"all": runs * 5, "none": runs, "some": runs // 5},
           "eviction": {"evict_device idle": runs * 4, "evict_host idle": runs * 4},
           "faults": faults}
    return {
        "schema": SOAK_REPORT_SCHEMA, "layout": "2x2", "variant": "fixed", "backend": "memory",
        "mode": "inprocess", "protocol": "sglang-0.5.20", "dp_attention": True,
        "seed": rng.randrange(1 << 31), "minutes": hours * 60, "runs": runs,
        "decisions": decisions, "seconds": seconds,
        "decisions_per_s": round(decisions / seconds, 1), "runs_per_s": runs_per_s,
        "faults": faults, "faults_never_fired": [], "status": status, "verdict": verdict,
        "seconds_to_divergence": seconds - 1 if diverged else None,
        "confirmed_by_replay": diverged if diverged else None, "interrupted": False,
        "unknown_runs": [{"run": 7, "t": 12.0, "diagnosis": "nemesis killed rank 1 (kill_rank)",
                          "error": "..."}] * 3,
        "unconfirmed_divergences": [], "unknown_diagnoses": ["nemesis killed rank 1"] * 3,
        "fault_events": events, "replay": "soak-out/replay-fixed-2x2-0123456789ab.json"
        if diverged else None,
        "prefetch_outcomes": {"revoke": runs * 3, "fetch": runs * 9, "terminate": runs},
        "coverage": cov, "timeline": timeline,
        "host_used": [rng.randint(8, 48) for _ in range(runs)],
        "shard": {"shard": f"{index}/{count}", "index": index, "count": count,
                  "base_seed": 1, "layouts": ["2x2"]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--runs-per-s", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    from scenarios.cli.main import main as cpcheck

    root = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        rng = random.Random(0)
        dirs = []
        for i in range(1, args.shards + 1):
            d = root / f"shard-{i}"
            d.mkdir()
            rep = synthetic_report(i, args.shards, args.hours, args.runs_per_s, rng,
                                   diverged=i == args.shards)
            atomic_write_text(d / "report.json", json.dumps(rep, indent=1))
            if rep["replay"]:
                (d / Path(rep["replay"]).name).write_text("{}")
            dirs.append(str(d))
        size = sum((Path(d) / "report.json").stat().st_size for d in dirs)
        times, cpu = [], []
        for k in range(args.repeat):
            out = root / f"merged-{k}"
            t0, c0 = time.perf_counter(), time.process_time()
            rc = cpcheck(["report", "merge", *dirs, "--out", str(out), "--json"])
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            assert rc == 1, f"the last shard diverged: the merge must exit 1, got {rc}"
        merged = json.loads((out / "report.json").read_text())
        print(f"report merge of {args.shards} shard reports of {args.hours:g} h "
              f"({merged['runs']} runs, {len(merged['fault_events'])} fault events, "
              f"{size / 1e6:.0f} MB of report.json): wall best {min(times):.2f} s, worst "
              f"{max(times):.2f} s; CPU best {min(cpu):.2f} s, worst {max(cpu):.2f} s (first: imports; over {args.repeat}; goal < 10 s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
