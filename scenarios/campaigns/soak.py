"""`cpcheck soak`: free-running chunks under a nemesis until the time budget is spent.

Gated exploration only visits interleavings someone drew; a soak lets real threads race (plus
injected faults) and records what each rank's decision points saw, so a divergence found by
timing alone still ends as a replay Schedule that `cpcheck replay` reruns deterministically.
A divergence counts only once its replay reproduces it; one that does not is kept (as an
`unknown-*.json` with both verdicts) and the soak hunts on for one that does.
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

from reference.api import STOP_POLICIES, STORAGE_BACKENDS, WRITE_POLICIES
from scenarios.cli.conventions import (
    add_output_flags,
    check_variant_arg,
    positive_float,
    variant_help,
)
from scenarios.cli.protocol_args import add_protocol_arguments, protocol_changes
from scenarios.core.config import PAGE
from scenarios.core.contract import STATUS_EXIT, ExitCode, stop_requested
from scenarios.core.errors import UsageError
from scenarios.core.records import RankResult
from scenarios.core.schedule import CachePolicy, Op, Schedule, tokens_for
from scenarios.generate.workload import soak_chunk
from scenarios.judge.coverage import Coverage
from scenarios.runner.worker import DEVICES
from scenarios.sut.reference_executor import MODES

#: divergences that did not replay before the soak stops hunting (the IO timing it cannot pin
#: is then too common for a confirmed finding): the verdict is unknown, with their files
MAX_UNCONFIRMED = 5


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpcheck soak` (cli.py builds the subparser and calls this)."""
    p.add_argument("--layout", default="1x2", help="TPxCP[xPP] (default 1x2)")
    p.add_argument("--backend", choices=STORAGE_BACKENDS, default="memory")
    p.add_argument("--minutes", type=positive_float, default=1.0,
                   help="wall-clock budget (default 1)")
    p.add_argument("--variant", default="fixed", help=variant_help("fixed or a known-bad variant"))
    p.add_argument("--faults", default="", metavar="LIST",
                   help="comma list of slow_rank,storage_latency,storage_errors,master_restart,"
                        "kill_rank (default: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="pin the run (default: a fresh random seed, printed and in the report)")
    p.add_argument("--mode", choices=MODES, default="inprocess",
                   help="inprocess (ranks as threads) or torchrun (faults act on the real "
                        "worker processes and master)")
    p.add_argument("--out", default="cpcheck-out/soak", help="report, plots and replay go here")
    p.add_argument("--mooncake-master", metavar="HOST:PORT", default="",
                   help="use this Mooncake master instead of starting one")
    p.add_argument("--timeout", type=positive_float, default=10.0,
                   help="seconds any rank may wait on a peer before the run fails")
    p.add_argument("--device", choices=DEVICES, default="auto")
    add_protocol_arguments(p)
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
        write_policy=rng.choice([WRITE_POLICIES[0], *WRITE_POLICIES]),  # write_through twice
        prefetch_stop_policy=rng.choice(STOP_POLICIES),
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
def _prefetch_outcomes(results: list[RankResult]) -> Counter:
    """Prefetch decisions by outcome's first word (revoke / fetch / terminate ...)."""
    c: Counter = Counter()
    for r in results:
        for d in r.decisions.get("prefetch", ()):
            words = str(d.outcome).split()
            c[words[0] if words else "?"] += 1
    return c


def _host_used(results: list[RankResult]) -> int:
    vals = [r.snapshot.get("host_used") for r in results]
    return max((int(v) for v in vals if isinstance(v, (int, float))), default=0)


# -- the command ---------------------------------------------------------------------------
def cmd_soak(args: argparse.Namespace) -> int:
    """Run chunks until the budget is spent; exit codes from scenarios/core/contract.py."""
    from scenarios.cli.conventions import check_device
    from scenarios.core.layout import Layout
    from scenarios.nemesis.faults import Nemesis
    from scenarios.nemesis.mooncake_session import mooncake_for
    from scenarios.store.report import check_writable, native_stderr_to
    from scenarios.sut.reference_executor import Executor

    layout = str(Layout.parse(args.layout))
    check_variant_arg(args.variant)
    args.protocol_changes = protocol_changes(args)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    nem = Nemesis.parse(args.faults, seed=seed)
    if args.mode == "torchrun":
        nem.for_torchrun()  # faults act on the real worker processes and the master
    check_device(args.device)
    out = check_writable(Path(args.out))  # before the first run, not after the budget
    print(f"cpcheck soak: seed {seed}", file=sys.stderr, flush=True)
    world = Layout.parse(layout).world_size

    with ExitStack() as stack:
        if args.backend == "mooncake" and not args.verbose:  # its log goes to --out, not here
            stack.enter_context(native_stderr_to(out / "mooncake.log"))
        master, mm = stack.enter_context(mooncake_for(args.backend, args.mooncake_master,
                                                      log_dir=out))
        if mm is not None:
            nem.attach_master(mm)
        if nem.unsupported():
            raise UsageError(str(nem.unsupported()))
        ex = stack.enter_context(Executor(args.mode, timeout_s=args.timeout,
                                          mooncake_master=master, device=args.device))
        return _loop(args, ex, nem if nem.active else None, seed, layout, world, out, mm)


def _infrastructure(args: argparse.Namespace, nem: Any, mm: Any) -> str:
    """What broke outside the system under test and was not asked for ("" if nothing): the
    run is `unknown` and the soak stops (a kill_rank the user asked for is handled apart)."""
    if mm is not None and not mm.running:
        asked = "with" if nem is not None and "master_restart" in nem.kinds else "without"
        return (f"the soak's Mooncake master (pid {mm.pid}) is gone, {asked} a master_restart "
                f"fault asked; log: {mm.log_path}")
    if args.backend == "mooncake" and args.mooncake_master:
        from scenarios.nemesis.mooncake_master import MooncakeMasterError, check_master_reachable

        try:
            check_master_reachable(args.mooncake_master, timeout=2.0)
        except MooncakeMasterError as e:
            return f"Mooncake master lost: {e}"
    return ""


def _loop(args: argparse.Namespace, ex: Any, nem: Any, seed: int, layout: str, world: int,
          out: Path, mm: Any) -> int:
    from scenarios.core.verdict import Verdict
    from scenarios.judge.judging import confirm, run_checked
    from scenarios.store.replay import write_replay
    from scenarios.store.report import SoakReport

    rng = random.Random(seed)
    budget = args.minutes * 60.0
    writer = SoakReport(out)  # imports matplotlib: setup, not part of the budget
    t0 = time.monotonic()
    runs = decisions = 0
    timeline: list[dict] = []
    outcomes: Counter = Counter()
    coverage = Coverage()
    host_used: list[int] = []
    verdict = Verdict(True, message="all runs agree")
    replay_path: Path | None = None
    first_s: float | None = None
    interrupted = False
    unknown: list[dict] = []  # runs broken by a kill_rank we injected: not judged, soak goes on
    candidate: Schedule | None = None  # a divergence not yet confirmed by replay
    #: divergences whose gated replay agreed: kept (file, diagnosis), and the hunt goes on for
    #: one that replays; only these left at the end make the verdict unknown
    unconfirmed: list[dict] = []
    first_unconfirmed: Verdict | None = None
    protocol: dict = {"protocol": None, "dp_attention": None}  # of the chunks run

    def report() -> dict:
        """The one place the report is built (written after every chunk and at the end)."""
        elapsed = time.monotonic() - t0
        return {
            "layout": layout, "variant": args.variant, "backend": args.backend,
            "mode": args.mode, **protocol, "seed": seed, "minutes": args.minutes, "runs": runs,
            "decisions": decisions, "seconds": round(elapsed, 2),
            "decisions_per_s": round(decisions / elapsed, 1) if elapsed else 0.0,
            "runs_per_s": round(runs / elapsed, 2) if elapsed else 0.0,
            "faults": nem.counts() if nem else {},
            # asked for but never landed in a run: the soak did not test what its flags say
            "faults_never_fired": sorted(k for k, n in (nem.counts() if nem else {}).items()
                                         if n == 0),
            "status": verdict.status,
            "verdict": verdict.to_dict(), "seconds_to_divergence": first_s,
            "confirmed_by_replay": verdict.stats.get("confirmed_by_replay"),
            "interrupted": interrupted, "unknown_runs": unknown,
            "unconfirmed_divergences": unconfirmed,
            "unknown_diagnoses": [u["diagnosis"] for u in unknown[:20]],
            "fault_events": nem.events if nem else [],
            "replay": str(replay_path) if replay_path else None,
            "prefetch_outcomes": dict(outcomes), "coverage": coverage.to_dict(),
            "timeline": timeline,
        }

    extra_plots: dict = {"coverage.png": coverage.plot}
    if nem is not None:
        from scenarios.nemesis.faults import plot_events

        extra_plots["faults.png"] = lambda path: plot_events(path, nem.events,
                                                              time.monotonic() - t0)

    def write(plots: bool | None = None) -> None:
        writer.write(report(), timeline, outcomes, host_used, plots=plots,
                     extra_plots=extra_plots)

    progress = Progress(budget)
    try:
        write(plots=False)
        while time.monotonic() - t0 < budget:
            if stop_requested.is_set():  # a signal whose exception was swallowed somewhere
                raise KeyboardInterrupt
            s, gated = soak_chunk(rng, runs, layout, args.variant, args.backend, make_chunk,
                                  coverage)
            if args.protocol_changes:
                s = s.with_(**args.protocol_changes)
            protocol.update(protocol=s.protocol, dp_attention=s.dp_attention)
            before = nem.total() if nem else 0
            faults_before = dict(nem.counts()) if nem else {}
            faulted = nem if nem and not gated else None  # a gated chunk's timing is scripted
            if faulted:
                faulted.begin_run(world)
            rt0 = time.monotonic()
            try:
                results, v = run_checked(ex, s, gated=gated, nemesis=faulted)
            finally:
                if faulted:
                    faulted.end_run()
            run_s = time.monotonic() - rt0
            runs += 1
            n_dec = int(v.stats.get("decisions", 0))
            decisions += n_dec
            outcomes.update(_prefetch_outcomes(results))
            coverage.add(s, results, {k: n - faults_before.get(k, 0)
                                      for k, n in (nem.counts() if nem else {}).items()})
            host_used.append(_host_used(results))
            elapsed = time.monotonic() - t0
            fired = (nem.total() if nem else 0) - before
            timeline.append({"t": round(elapsed, 3), "runs": runs, "decisions": decisions,
                             "decisions_per_s": round(decisions / elapsed, 1),
                             "run_decisions_per_s": round(n_dec / run_s, 1) if run_s else 0.0,
                             "faults_in_run": fired})
            progress.update(elapsed, runs, decisions, nem.total() if nem else 0)
            if v.status != "agree":
                broke = _infrastructure(args, nem, mm)
                killed = faulted.explain() if faulted else None
                if killed and not broke:  # the kill_rank the user asked for: record, go on
                    unknown.append({"run": runs, "t": round(elapsed, 3),
                                    "diagnosis": f"{killed} (kill_rank): the run is not judged",
                                    "error": v.summary()[:300]})
                    write()
                    continue
                if broke or v.status == "unknown":
                    verdict = v if not broke else Verdict.unknown(
                        f"{broke}; the run said: {v.summary()}")
                    break
                first_s = elapsed
                rep = s
                if results and all(r.recorded is not None for r in results):
                    rep = s.with_(choices={r.rank: list(r.recorded.choices) for r in results},
                                  faults={r.rank: [list(f) for f in r.recorded.faults]
                                          for r in results})
                verdict, candidate = v, rep  # kept even if interrupted while confirming
                write()
                verdict = confirm(ex, rep, v)  # a divergence is replayed once before it counts
                path = write_replay(rep, verdict, out, args.mode,
                                    confirmation=verdict.stats.get("confirmation"))
                candidate = None
                if verdict.status == "diverge":
                    replay_path = path
                    break
                # not reproduced (the run read IO state its recording could not pin): keep the
                # file, say so, and hunt on for a divergence that replays
                unconfirmed.append({"run": runs, "t": round(elapsed, 3), "file": str(path),
                                    "diagnosis": verdict.diagnosis})
                first_unconfirmed = first_unconfirmed or verdict
                verdict = Verdict(True, message="all runs agree")
                if len(unconfirmed) >= MAX_UNCONFIRMED:
                    break
            write()
        if runs == len(unknown) and verdict.status == "agree":  # nothing was judged
            verdict = Verdict.unknown(f"no run was judged within the {budget:.0f} s budget "
                                      f"({runs} run(s), {len(unknown)} cut by kill_rank)")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was found, say so, stop
        interrupted = True
        if mm is not None:  # its data is not needed any more: no grace period on the way out
            mm.kill_now()
        if candidate is not None and replay_path is None:
            verdict = Verdict.unknown(f"interrupted before the divergence was confirmed by "
                                      f"replay: {verdict.summary()}", invariant=verdict.invariant,
                                      failures=verdict.failures, stats=verdict.stats)
            replay_path = write_replay(candidate, verdict, out, args.mode)
    except Exception as e:  # an internal error is no verdict on the system under test
        verdict = Verdict.unknown(f"internal error: {type(e).__name__}: {e}")
        if args.verbose:
            import traceback

            traceback.print_exc()
    finally:
        progress.close()
        if verdict.status == "agree" and first_unconfirmed is not None:
            verdict = first_unconfirmed  # found, never reproduced: unknown, with its file
            replay_path = Path(unconfirmed[0]["file"])
        try:  # the report and the verdict line first, the slower plots last
            write(plots=False)
        finally:
            _print_verdict(args, report(), verdict, replay_path, out, first_s, coverage)
            # after Ctrl-C the plots stay as last drawn (at most PLOT_EVERY_S old): stop in 3 s
            write(plots=not (interrupted and writer.plotted))
    if interrupted and verdict.status == "agree":
        return int(ExitCode.INTERRUPTED)
    return int(STATUS_EXIT[verdict.status or "unknown"])


def _print_verdict(args: argparse.Namespace, rep: dict, verdict: Any, replay_path: Path | None,
                   out: Path, first_s: float | None, coverage: Coverage) -> None:
    """The verdict line, always (also after Ctrl-C, SIGTERM or an internal error)."""
    from scenarios.cli.conventions import emit_json, human

    o = human(args)
    faults = rep["faults"]
    print(f"outcome coverage ({rep['runs']} runs):\n{coverage.table()}", file=o)
    print(f"soak layout={rep['layout']} variant={args.variant} protocol={rep['protocol']} "
          f"dp_attention={rep['dp_attention']} backend={args.backend} mode={args.mode} "
          f"seed={rep['seed']}: {rep['runs']} runs, {rep['decisions']} decisions "
          f"in {rep['seconds']:.1f} s ({rep['decisions_per_s']:.0f}/s); faults {faults or 'none'}"
          f"{'; INTERRUPTED' if rep['interrupted'] else ''}", file=o)
    if rep["faults_never_fired"]:
        print(f"warning: fault(s) asked for but never fired: {', '.join(rep['faults_never_fired'])} "
              "(runs too short or too few for their windows: soak longer)", file=o)
    if rep["unknown_runs"]:
        print(f"{len(rep['unknown_runs'])} run(s) broken by an injected kill were not judged "
              f"(unknown): {rep['unknown_runs'][0]['diagnosis']}", file=o)
    if rep["unconfirmed_divergences"] and verdict.status != "unknown":
        u = rep["unconfirmed_divergences"]
        print(f"{len(u)} divergence(s) did not reproduce on replay (kept, both verdicts in "
              f"{u[0]['file']}); the soak hunted on", file=o)
    if verdict.status == "diverge":
        print(f"DIVERGE [{verdict.invariant}] after {first_s:.1f} s: {verdict.message}", file=o)
        print("confirmed by replay", file=o)
        print(f"replay: cpcheck replay {replay_path} --mode {args.mode}", file=o)
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
