"""`cpcheck soak`: free-running chunks under a nemesis until the time budget is spent.

Gated exploration only visits interleavings someone drew; a soak lets real threads race (plus
injected faults) and records what each rank's decision points saw, so a divergence found by
timing alone still ends as a replay Schedule that `cpcheck replay` reruns deterministically.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from reference.api import VARIANTS
from scenarios.cli_conventions import variant_help
from scenarios.contract import UsageError
from scenarios.coverage import Coverage
from scenarios.protocol_args import add_protocol_arguments, protocol_changes
from scenarios.schedule import CachePolicy, Op, Schedule, tokens_for
from scenarios.workload import soak_chunk

EXIT_AGREE, EXIT_DIVERGE, EXIT_USAGE, EXIT_CANNOT_RUN = 0, 1, 2, 125
PAGE = 4


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpcheck soak` (cli.py builds the subparser and calls this)."""
    p.add_argument("--layout", default="1x2", help="TPxCP[xPP] (default 1x2)")
    p.add_argument("--backend", choices=["memory", "file", "mooncake"], default="memory")
    p.add_argument("--minutes", type=float, default=1.0, help="wall-clock budget (default 1)")
    p.add_argument("--variant", default="fixed", help=variant_help("fixed or a known-bad variant"))
    p.add_argument("--faults", default="", metavar="LIST",
                   help="comma list of slow_rank,storage_latency,storage_errors,master_restart,"
                        "kill_rank (default: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="pin the run (default: a fresh random seed, printed and in the report)")
    p.add_argument("--mode", choices=["inprocess", "torchrun"], default="inprocess",
                   help="inprocess (ranks as threads) or torchrun (faults act on the real "
                        "worker processes and master)")
    p.add_argument("--out", default="cpcheck-out/soak", help="report, plots and replay go here")
    p.add_argument("--mooncake-master", metavar="HOST:PORT", default="",
                   help="use this Mooncake master instead of starting one")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds any rank may wait on a peer before the run fails")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_protocol_arguments(p)


# -- chunk generation ----------------------------------------------------------------------
def make_chunk(rng: random.Random, index: int, layout: str, variant: str,
               backend: str) -> Schedule:
    """One stream of ~20-40 ops: shared prefixes, small pools (evictions), steps and aborts.

    Every chunk writes through to storage and re-adds earlier prefixes with prefetch on, so
    write-through acks and prefetch decisions (where CP ranks can disagree) are always exercised.
    """
    cache = CachePolicy(
        page_size=PAGE,
        # small pools on purpose: evictions under pressure are where slots leak
        device_pages=rng.choice([12, 16, 24]),
        host_pages=rng.choice([16, 24, 48]),
        mla=rng.random() < 0.3,
        write_policy=rng.choice(["write_through", "write_through", "write_through_selective",
                                 "write_back"]),
        prefetch_stop_policy=rng.choice(["best_effort", "wait_complete", "timeout"]),
        prefetch_threshold=rng.choice([0, 0, 8]),
        prefetch_batch_pages=rng.randint(1, 3),
        prefetch_timeout_ticks=rng.randint(1, 8),
    )
    target = rng.randint(20, 40)
    ops: list[Op] = []
    live: list[str] = []
    groups = rng.randint(2, 4)
    i = 0
    while len(ops) < target:
        shared = rng.randrange(groups)
        rid = f"c{index}q{i}"
        tokens = tokens_for(shared, rng.choice([8, 16, 24]), i, rng.randint(1, 9))
        ops.append(Op(kind="add", rid=rid, tokens=tokens, prefetch=rng.random() < 0.85))
        live.append(rid)
        i += 1
        for _ in range(rng.randint(1, 3)):
            action = rng.choice(["step", "step", "step", "evict_device", "evict_host", "abort"])
            if action == "abort" and live:
                ops.append(Op(kind="abort", rid=live.pop(rng.randrange(len(live)))))
            elif action in ("evict_device", "evict_host"):
                ops.append(Op(kind=action, n=rng.choice([8, 32, 1000])))
            else:
                ops.append(Op(kind="step"))
    return Schedule(name=f"soak-{index}", layout=layout, variant=variant, backend=backend,
                    cache=cache, ops=ops, seed=rng.randrange(1 << 30))


# -- progress ------------------------------------------------------------------------------
class Progress:
    """One live line on a TTY (rich), plain lines every few seconds otherwise."""

    def __init__(self, budget_s: float) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.budget_s = budget_s
        self.live: Any = None
        self._last_plain = 0.0
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, elapsed: float, runs: int, decisions: int, faults: int) -> None:
        rate = decisions / elapsed if elapsed > 0 else 0.0
        line = (f"soak {elapsed:6.1f}s / {self.budget_s:.0f}s (left {max(self.budget_s - elapsed, 0):.0f}s)"
                f"  runs {runs}  decisions {decisions}  {rate:.0f}/s  faults {faults}")
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text(line))
        elif elapsed - self._last_plain >= 5.0:
            self._last_plain = elapsed
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


# -- report --------------------------------------------------------------------------------
def _prefetch_outcomes(results: list[dict]) -> Counter:
    """Prefetch decisions by outcome's first word (revoke / fetch / terminate ...)."""
    c: Counter = Counter()
    for r in results:
        for entry in r.get("decisions", {}).get("prefetch", []):
            outcome = str(entry[4]) if len(entry) > 4 else "?"
            c[outcome.split()[0] if outcome.split() else "?"] += 1
    return c


def _plots(out: Path, timeline: list[dict], outcomes: Counter, host_used: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ts = [p["t"] for p in timeline]
    ax.plot(ts, [p["run_decisions_per_s"] for p in timeline], lw=1, label="per run")
    ax.plot(ts, [p["decisions_per_s"] for p in timeline], lw=1.5, label="cumulative")
    first = True
    for p in timeline:
        if p["faults_in_run"]:
            ax.axvline(p["t"], color="red", alpha=0.25, lw=0.8,
                       label="faults injected" if first else None)
            first = False
    ax.set_xlabel("seconds")
    ax.set_ylabel("decisions / s")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decisions_per_s.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = sorted(outcomes) or ["none"]
    ax.bar(names, [outcomes.get(n, 0) for n in names])
    ax.set_ylabel("prefetch decisions (all ranks)")
    fig.tight_layout()
    fig.savefig(out / "prefetch_outcomes.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(host_used) + 1), host_used, marker=".", lw=1)
    ax.set_xlabel("run")
    ax.set_ylabel("host slots used at end (max over ranks)")
    fig.tight_layout()
    fig.savefig(out / "host_pool.png", dpi=90)
    plt.close(fig)


def _host_used(results: list[dict]) -> int:
    vals = [r.get("snapshot", {}).get("host_used") for r in results]
    return max((int(v) for v in vals if isinstance(v, (int, float))), default=0)


# -- the command ---------------------------------------------------------------------------
def cmd_soak(args: argparse.Namespace) -> int:
    """Run chunks until the budget is spent; 0 agree, 1 diverge, 2 bad input, 125 cannot run."""
    from scenarios.checker import Verdict, check
    from scenarios.executor import Executor
    from scenarios.layout import Layout, LayoutError
    from scenarios.nemesis import Nemesis, NemesisError
    from scenarios.replay import write_replay

    try:
        layout = str(Layout.parse(args.layout))
    except LayoutError as e:
        print(f"cpcheck: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.variant not in VARIANTS:
        print(f"cpcheck: unknown variant '{args.variant}': choose one of {', '.join(VARIANTS)}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        args.protocol_changes = protocol_changes(args)
    except UsageError as e:
        print(f"cpcheck: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.minutes <= 0:
        print("cpcheck: --minutes must be positive", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    try:
        nem = Nemesis.parse(args.faults, seed=seed)
    except NemesisError as e:
        print(f"cpcheck: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.mode == "torchrun":
        nem.for_torchrun()
    print(f"cpcheck soak: seed {seed}", file=sys.stderr, flush=True)
    world = Layout.parse(layout).world_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        from scenarios.mooncake_session import CannotRun, mooncake_for

        try:
            master, mm = stack.enter_context(mooncake_for(args.backend, args.mooncake_master))
        except (CannotRun, OSError, RuntimeError, ValueError) as e:
            # no master to soak against (unreachable, or Mooncake not installed)
            print(f"cpcheck: cannot run here: {e}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        if mm is not None:
            nem.attach_master(mm)
        if nem.unsupported():
            print(f"cpcheck: {nem.unsupported()}", file=sys.stderr)
            return EXIT_USAGE
        ex = stack.enter_context(Executor(args.mode, timeout_s=args.timeout,
                                          mooncake_master=master, device=args.device))
        return _loop(args, ex, nem if nem.active else None, seed, layout, world, out,
                     check, write_replay, Verdict)


def _loop(args: argparse.Namespace, ex: Any, nem: Any, seed: int, layout: str, world: int,
          out: Path, check: Any, write_replay: Any, Verdict: Any) -> int:  # noqa: N803
    rng = random.Random(seed)
    budget = args.minutes * 60.0
    t0 = time.monotonic()
    runs = decisions = 0
    timeline: list[dict] = []
    outcomes: Counter = Counter()
    coverage = Coverage()
    host_used: list[int] = []
    verdict_d: dict = {"ok": True, "invariant": None, "message": "all runs agree"}
    replay_path: Path | None = None
    first_s: float | None = None
    unknown: list[dict] = []  # runs broken by a kill we injected: not judged
    progress = Progress(budget)
    try:
        while time.monotonic() - t0 < budget:
            s, gated = soak_chunk(rng, runs, layout, args.variant, args.backend, make_chunk,
                                  coverage)
            if args.protocol_changes:
                s = s.with_(**args.protocol_changes)
            before = nem.total() if nem else 0
            faults_before = dict(nem.counts()) if nem else {}
            if nem:
                nem.begin_run(world)
            rt0 = time.monotonic()
            try:
                results = ex.run(s, gated=gated, nemesis=None if gated else nem)
                verdict = check(s, results)
            except Exception as e:  # the run itself broke (ranks never finished): a finding
                results = []
                verdict = Verdict(False, "error", f"{type(e).__name__}: {e}",
                                  [("error", f"{type(e).__name__}: {e}")])
            finally:
                if nem:
                    nem.end_run()
            run_s = time.monotonic() - rt0
            runs += 1
            n_dec = int(verdict.stats.get("decisions", 0))
            decisions += n_dec
            outcomes.update(_prefetch_outcomes(results))
            coverage.add(s, results, {k: v - faults_before.get(k, 0)
                                      for k, v in (nem.counts() if nem else {}).items()})
            host_used.append(_host_used(results))
            elapsed = time.monotonic() - t0
            fired = (nem.total() if nem else 0) - before
            timeline.append({"t": round(elapsed, 3), "runs": runs, "decisions": decisions,
                             "decisions_per_s": round(decisions / elapsed, 1),
                             "run_decisions_per_s": round(n_dec / run_s, 1) if run_s else 0.0,
                             "faults_in_run": fired})
            progress.update(elapsed, runs, decisions, nem.total() if nem else 0)
            why = nem.explain() if nem and not verdict.ok else None
            if why:
                unknown.append({"run": runs, "t": round(elapsed, 3), "diagnosis": why,
                                "error": verdict.message[:300]})
            elif not verdict.ok:
                first_s = elapsed
                verdict_d = verdict.to_dict()
                rep = s
                if results and all("recorded" in r for r in results):
                    rep = s.with_(choices={r["rank"]: r["recorded"]["choices"] for r in results},
                                  faults={r["rank"]: [list(f) for f in r["recorded"]["faults"]]
                                          for r in results})
                replay_path = write_replay(rep, verdict, out, args.mode)
                break
    finally:
        progress.close()
    elapsed = time.monotonic() - t0
    faults = nem.counts() if nem else {}
    report = {
        "layout": layout, "variant": args.variant, "backend": args.backend, "mode": args.mode,
        "protocol": s.protocol if runs else None, "dp_attention": s.dp_attention if runs else None,
        "seed": seed, "minutes": args.minutes, "runs": runs, "decisions": decisions,
        "seconds": round(elapsed, 2),
        "decisions_per_s": round(decisions / elapsed, 1) if elapsed else 0.0,
        "runs_per_s": round(runs / elapsed, 2) if elapsed else 0.0,
        "faults": faults, "verdict": verdict_d, "seconds_to_divergence": first_s,
        "replay": str(replay_path) if replay_path else None,
        "prefetch_outcomes": dict(outcomes), "coverage": coverage.to_dict(),
        "timeline": timeline,
        "unknown_runs": unknown, "fault_events": nem.events if nem else [],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _plots(out, timeline, outcomes, host_used)
    coverage.plot(out / "coverage.png")
    if nem:
        from scenarios.nemesis import plot_events

        plot_events(out / "faults.png", nem.events, elapsed)
    print(f"outcome coverage ({runs} runs):\n{coverage.table()}")
    print(f"soak layout={layout} variant={args.variant} protocol={report['protocol']} "
          f"dp_attention={report['dp_attention']} backend={args.backend} mode={args.mode} "
          f"seed={seed}: {runs} runs, {decisions} decisions in {elapsed:.1f} s "
          f"({report['decisions_per_s']:.0f}/s); faults {faults or 'none'}")
    if replay_path is not None:
        print(f"DIVERGE [{verdict_d['invariant']}] after {first_s:.1f} s: {verdict_d['message']}")
        print(f"replay: cpcheck replay {replay_path} --mode {args.mode}")
        print(f"report: {out / 'report.json'}")
        return EXIT_DIVERGE
    if unknown:
        print(f"{len(unknown)} run(s) broken by an injected kill were not judged "
              f"(unknown): {unknown[0]['diagnosis']}")
    print(f"AGREE: every run agreed; report: {out / 'report.json'}")
    return EXIT_AGREE
