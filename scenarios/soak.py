"""`cpcheck soak`: free-running chunks under a nemesis until the time budget is spent.

Gated exploration only visits interleavings someone drew; a soak lets real threads race (plus
injected faults) and records what each rank's decision points saw, so a divergence found by
timing alone still ends as a replay Schedule that `cpcheck replay` reruns deterministically.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from reference.variants import VARIANTS
from scenarios.contract import STATUS_EXIT, ExitCode, UsageError, stop_requested
from scenarios.schedule import CachePolicy, Op, Schedule, tokens_for

PAGE = 4


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpcheck soak` (cli.py builds the subparser and calls this)."""
    p.add_argument("--layout", default="1x2", help="TPxCP[xPP] (default 1x2)")
    p.add_argument("--backend", choices=["memory", "file", "mooncake"], default="memory")
    from scenarios.cli import add_output_flags, positive_float

    p.add_argument("--minutes", type=positive_float, default=1.0,
                   help="wall-clock budget (default 1)")
    p.add_argument("--variant", default="fixed", help="fixed or a known-bad variant")
    p.add_argument("--faults", default="", metavar="LIST",
                   help="comma list of slow_rank,storage_latency,storage_errors,master_restart,"
                        "kill_rank (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["inprocess", "torchrun"], default="inprocess",
                   help="inprocess (ranks as threads, faults injected) or torchrun (no nemesis: "
                        "--faults is ignored there)")
    p.add_argument("--out", default="cpcheck-out/soak", help="report, plots and replay go here")
    p.add_argument("--mooncake-master", metavar="HOST:PORT", default="",
                   help="use this Mooncake master instead of starting one")
    p.add_argument("--timeout", type=positive_float, default=10.0,
                   help="seconds any rank may wait on a peer before the run fails")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_output_flags(p)


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


def _host_used(results: list[dict]) -> int:
    vals = [r.get("snapshot", {}).get("host_used") for r in results]
    return max((int(v) for v in vals if isinstance(v, (int, float))), default=0)


# -- the command ---------------------------------------------------------------------------
def cmd_soak(args: argparse.Namespace) -> int:
    """Run chunks until the budget is spent; exit codes from scenarios/contract.py."""
    from scenarios.cli import check_device, mooncake_for
    from scenarios.executor import Executor
    from scenarios.layout import Layout
    from scenarios.nemesis import Nemesis
    from scenarios.report import check_writable, native_stderr_to

    layout = str(Layout.parse(args.layout))
    if args.variant not in VARIANTS:
        raise UsageError(f"unknown variant '{args.variant}': choose one of {', '.join(VARIANTS)}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    nem = Nemesis.parse(args.faults, seed=seed)
    check_device(args.device)
    out = check_writable(Path(args.out))  # before the first run, not after the budget
    if args.mode == "torchrun" and nem.active:
        print("cpcheck: note: torchrun mode runs without a nemesis; --faults ignored",
              file=sys.stderr)
    use_nemesis = args.mode == "inprocess"
    world = Layout.parse(layout).world_size

    with ExitStack() as stack:
        if args.backend == "mooncake" and not args.verbose:  # its log goes to --out, not here
            stack.enter_context(native_stderr_to(out / "mooncake.log"))
        master, mm = stack.enter_context(mooncake_for(args.backend, args.mooncake_master,
                                                      log_dir=out))
        if mm is not None:
            nem.restart = mm.restart
        ex = stack.enter_context(Executor(args.mode, timeout_s=args.timeout,
                                          mooncake_master=master, device=args.device))
        return _loop(args, ex, nem if use_nemesis else None, seed, layout, world, out, mm)


def _infrastructure(args: argparse.Namespace, nem: Any, mm: Any, killed: int) -> tuple[str, bool]:
    """(diagnosis, asked) when something outside the system under test broke this run; asked
    means the user's --faults did it (kill_rank), so the soak goes on. ("", False) if nothing."""
    if mm is not None and not mm.running:
        asked = "with" if nem is not None and "master_restart" in nem.kinds else "without"
        return (f"the soak's Mooncake master (pid {mm.pid}) is gone, {asked} a master_restart "
                f"fault asked; log: {mm.log_path}", False)
    if args.backend == "mooncake" and args.mooncake_master:
        from scenarios.mooncake_master import MooncakeMasterError, check_master_reachable

        try:
            check_master_reachable(args.mooncake_master, timeout=2.0)
        except MooncakeMasterError as e:
            return f"Mooncake master lost: {e}", False
    if killed:
        return f"the nemesis killed {killed} rank(s) (kill_rank): the run is not judged", True
    return "", False


def _loop(args: argparse.Namespace, ex: Any, nem: Any, seed: int, layout: str, world: int,
          out: Path, mm: Any) -> int:
    from scenarios.checker import Verdict
    from scenarios.judge import confirm, run_checked
    from scenarios.replay import write_replay
    from scenarios.report import SoakReport

    rng = random.Random(seed)
    budget = args.minutes * 60.0
    t0 = time.monotonic()
    runs = decisions = 0
    timeline: list[dict] = []
    outcomes: Counter = Counter()
    host_used: list[int] = []
    verdict = Verdict(True, message="all runs agree")
    replay_path: Path | None = None
    first_s: float | None = None
    interrupted = False
    unknown_runs: list[str] = []
    candidate: Schedule | None = None  # a divergence not yet confirmed by replay
    writer = SoakReport(out)

    def report() -> dict:
        elapsed = time.monotonic() - t0
        return {
            "layout": layout, "variant": args.variant, "backend": args.backend,
            "mode": args.mode, "seed": seed, "minutes": args.minutes, "runs": runs,
            "decisions": decisions, "seconds": round(elapsed, 2),
            "decisions_per_s": round(decisions / elapsed, 1) if elapsed else 0.0,
            "runs_per_s": round(runs / elapsed, 2) if elapsed else 0.0,
            "faults": nem.counts() if nem else {}, "status": verdict.status,
            "verdict": verdict.to_dict(), "seconds_to_divergence": first_s,
            "confirmed_by_replay": verdict.stats.get("confirmed_by_replay"),
            "interrupted": interrupted, "unknown_runs": len(unknown_runs),
            "unknown_diagnoses": unknown_runs[:20],
            "replay": str(replay_path) if replay_path else None,
            "prefetch_outcomes": dict(outcomes), "timeline": timeline,
        }

    progress = Progress(budget)
    try:
        writer.write(report(), timeline, outcomes, host_used, plots=False)
        while time.monotonic() - t0 < budget:
            if stop_requested.is_set():  # a signal whose exception was swallowed somewhere
                raise KeyboardInterrupt
            s = make_chunk(rng, runs, layout, args.variant, args.backend)
            before = nem.total() if nem else 0
            killed_before = nem.counts().get("kill_rank", 0) if nem else 0
            if nem:
                nem.begin_run(world)
            rt0 = time.monotonic()
            try:
                results, v = run_checked(ex, s, gated=False, nemesis=nem)
            finally:
                if nem:
                    nem.end_run()
            run_s = time.monotonic() - rt0
            runs += 1
            n_dec = int(v.stats.get("decisions", 0))
            decisions += n_dec
            outcomes.update(_prefetch_outcomes(results))
            host_used.append(_host_used(results))
            elapsed = time.monotonic() - t0
            fired = (nem.total() if nem else 0) - before
            timeline.append({"t": round(elapsed, 3), "runs": runs, "decisions": decisions,
                             "decisions_per_s": round(decisions / elapsed, 1),
                             "run_decisions_per_s": round(n_dec / run_s, 1) if run_s else 0.0,
                             "faults_in_run": fired})
            progress.update(elapsed, runs, decisions, nem.total() if nem else 0)
            if v.status != "agree":
                killed = (nem.counts().get("kill_rank", 0) if nem else 0) - killed_before
                broke, asked = _infrastructure(args, nem, mm, killed)
                if asked:  # the fault the user asked for: record it, keep soaking
                    unknown_runs.append(f"run {runs}: {broke}; {v.summary()}")
                    writer.write(report(), timeline, outcomes, host_used)
                    continue
                if broke or v.status == "unknown":
                    verdict = v if not broke else Verdict.unknown(
                        f"{broke}; the run said: {v.summary()}")
                    break
                first_s = elapsed
                rep = s
                if results and all("recorded" in r for r in results):
                    rep = s.with_(choices={r["rank"]: r["recorded"]["choices"] for r in results},
                                  faults={r["rank"]: [list(f) for f in r["recorded"]["faults"]]
                                          for r in results})
                verdict, candidate = v, rep  # kept even if interrupted while confirming
                writer.write(report(), timeline, outcomes, host_used)
                verdict = confirm(ex, rep, v)  # a divergence is replayed once before it counts
                replay_path = write_replay(rep, verdict, out, "inprocess",
                                           confirmation=verdict.stats.get("confirmation"))
                break
            writer.write(report(), timeline, outcomes, host_used)
        if runs == len(unknown_runs) and verdict.status == "agree":  # nothing was judged
            verdict = Verdict.unknown(f"no run was judged within the {budget:.0f} s budget "
                                      f"({runs} run(s), {len(unknown_runs)} cut by kill_rank)")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was found, say so, stop
        interrupted = True
        if mm is not None:  # its data is not needed any more: no grace period on the way out
            mm.kill_now()
        if candidate is not None and replay_path is None:
            verdict = Verdict.unknown(f"interrupted before the divergence was confirmed by "
                                      f"replay: {verdict.summary()}", invariant=verdict.invariant,
                                      failures=verdict.failures, stats=verdict.stats)
            replay_path = write_replay(candidate, verdict, out, "inprocess")
    except Exception as e:  # an internal error is no verdict on the system under test
        verdict = Verdict.unknown(f"internal error: {type(e).__name__}: {e}")
        if args.verbose:
            import traceback

            traceback.print_exc()
    finally:
        progress.close()
        try:  # the report and the verdict line first, the slower plots last
            writer.write(report(), timeline, outcomes, host_used, plots=False)
        finally:
            _print_verdict(args, report(), verdict, replay_path, out, first_s)
            # after Ctrl-C the plots stay as last drawn (at most PLOT_EVERY_S old): stop in 3 s
            writer.write(report(), timeline, outcomes, host_used,
                         plots=not (interrupted and writer.plotted))
    if interrupted and verdict.status == "agree":
        return int(ExitCode.INTERRUPTED)
    return int(STATUS_EXIT[verdict.status or "unknown"])


def _print_verdict(args: argparse.Namespace, rep: dict, verdict: Any, replay_path: Path | None,
                   out: Path, first_s: float | None) -> None:
    """The verdict line, always (also after Ctrl-C, SIGTERM or an internal error)."""
    from scenarios.cli import emit_json, human

    o = human(args)
    faults = rep["faults"]
    print(f"soak layout={rep['layout']} variant={args.variant} backend={args.backend} "
          f"mode={args.mode} seed={rep['seed']}: {rep['runs']} runs, {rep['decisions']} decisions "
          f"in {rep['seconds']:.1f} s ({rep['decisions_per_s']:.0f}/s); faults {faults or 'none'}"
          f"{'; INTERRUPTED' if rep['interrupted'] else ''}", file=o)
    if rep["unknown_runs"]:
        print(f"{rep['unknown_runs']} run(s) not judged (kill_rank): {rep['unknown_diagnoses'][0]}",
              file=o)
    if verdict.status == "diverge":
        print(f"DIVERGE [{verdict.invariant}] after {first_s:.1f} s: {verdict.message}", file=o)
        print("confirmed by replay", file=o)
        print(f"replay: cpcheck replay {replay_path} --mode inprocess", file=o)
    elif verdict.status == "unknown":
        print(verdict.summary(), file=o)
        if replay_path is not None:
            print(f"not reproduced; both verdicts in {replay_path}", file=o)
    elif rep["interrupted"]:
        print(f"INTERRUPTED: every run so far agreed; report: {out / 'report.json'}", file=o)
    else:
        print(f"AGREE: every run agreed; report: {out / 'report.json'}", file=o)
    if verdict.status != "agree":
        print(f"report: {out / 'report.json'}", file=o)
    code = (ExitCode.INTERRUPTED if rep["interrupted"] and verdict.status == "agree"
            else STATUS_EXIT[verdict.status or "unknown"])
    emit_json(args, {"status": "interrupted" if code == ExitCode.INTERRUPTED else verdict.status,
                     "invariant": verdict.invariant, "message": verdict.message,
                     "diagnosis": verdict.diagnosis, "exit_code": int(code),
                     "confirmed_by_replay": verdict.stats.get("confirmed_by_replay"),
                     "replay": str(replay_path) if replay_path else None,
                     "report": str(out / "report.json")})
