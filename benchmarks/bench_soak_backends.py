"""Soak throughput, memory vs Mooncake, in the same layout, mode and seed, side by side.

Runs short `cpcheck soak`s (each in its own process, so every Mooncake soak starts its own
master) and prints decisions/s: over the whole soak, and steady (from the end of the first
run to the end of the last, i.e. without the torchrun pool's start-up).

    python3 benchmarks/bench_soak_backends.py --layout 2x2 --minutes 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def soak(layout: str, backend: str, mode: str, minutes: float, seed: int, faults: str,
         out: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                        if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "scenarios.cli", "soak", "--layout", layout, "--backend",
           backend, "--mode", mode, "--minutes", str(minutes), "--seed", str(seed),
           "--out", str(out)]
    if faults:
        cmd += ["--faults", faults]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=minutes * 60 + 300)
    report = out / "latest" / "report.json"  # each soak writes a run dir under --out
    if not report.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"soak {backend}/{mode} wrote no report (rc {proc.returncode}): "
                         + " | ".join(tail))
    rep = json.loads(report.read_text())
    rep["rc"] = proc.returncode
    return rep


def steady_rate(rep: dict) -> float:
    tl = rep["timeline"]
    if len(tl) < 3:
        return rep["decisions_per_s"]
    a, b = tl[0], tl[-1]
    return (b["decisions"] - a["decisions"]) / max(b["t"] - a["t"], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="2x2")
    ap.add_argument("--minutes", type=float, default=0.5, help="per soak (default 0.5)")
    ap.add_argument("--modes", default="inprocess,torchrun")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", default="", help="same --faults for every soak (default none)")
    args = ap.parse_args()
    print(f"layout {args.layout}, {args.minutes} min per soak, seed {args.seed}, "
          f"faults {args.faults or 'none'}\n")
    print("| mode | memory decisions/s (steady) | mooncake decisions/s (steady) "
          "| mooncake / memory (steady) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="cpcheck-bench-soak-") as tmp:
        for mode in args.modes.split(","):
            reps = {b: soak(args.layout, b, mode, args.minutes, args.seed, args.faults,
                            Path(tmp) / f"{mode}-{b}") for b in ("memory", "mooncake")}
            mem, mc = reps["memory"], reps["mooncake"]
            bad = [f"{b} rc {r['rc']}" for b, r in reps.items() if r["rc"] != 0]
            note = f" ({', '.join(bad)})" if bad else ""
            print(f"| {mode} | {mem['decisions_per_s']:.0f} ({steady_rate(mem):.0f}) "
                  f"| {mc['decisions_per_s']:.0f} ({steady_rate(mc):.0f}) "
                  f"| {mc['decisions_per_s'] / max(mem['decisions_per_s'], 1e-9):.0%} "
                  f"({steady_rate(mc) / max(steady_rate(mem), 1e-9):.0%}){note} |", flush=True)


if __name__ == "__main__":
    main()
