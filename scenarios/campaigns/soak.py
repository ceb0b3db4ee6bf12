"""`cpcheck soak`: free-running chunks under a nemesis until the time budget is spent.

Gated exploration only visits interleavings someone drew; a soak lets real threads race (plus
injected faults) and records what each rank's decision points saw, so a divergence found by
timing alone still ends as a replay Schedule that `cpcheck replay` reruns deterministically.
A divergence counts only once its replay reproduces it; one that does not is kept (as an
`unknown-*.json` with both verdicts) and the soak hunts on for one that does.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import time
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference.api import STOP_POLICIES, WRITE_POLICIES, effective_configuration
from scenarios.campaigns.soak_watch import InfrastructureLost, Watchdog, lost_raises
from scenarios.core.config import PAGE
from scenarios.core.contract import STATUS_EXIT, ExitCode, stop_requested
from scenarios.core.errors import UsageError
from scenarios.core.records import RankResult
from scenarios.core.schedule import CachePolicy, Op, Schedule, tokens_for
from scenarios.core.soak_config import SoakConfig
from scenarios.core.suts import is_sglang
from scenarios.core.verdict import Verdict
from scenarios.generate.workload import soak_chunk
from scenarios.judge.coverage import Coverage
from scenarios.store.report import ReportWriter, SoakReport
from scenarios.store.run_dir import RunDir

#: divergences that did not replay before the soak stops hunting (the IO timing it cannot pin
#: is then too common for a confirmed finding): the verdict is unknown, with their files
MAX_UNCONFIRMED = 5
#: free bytes on --out the soak keeps for its report and replay files: once the disk falls
#: below it during the soak, no new run starts and the soak ends `unknown`
LOW_DISK_BYTES = 16 << 20


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of `path` (None if it cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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
        # 0, one page (what 0 meant up to 0.5.17, whose controller clamps it: 0.5.18+ keep
        # a prefetch with no hit at 0, so revokes need a threshold), two pages
        prefetch_threshold=rng.choice([0, PAGE, 8]),
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
    return max((r.snapshot.host_used for r in results if r.snapshot is not None), default=0)


# -- the soak ------------------------------------------------------------------------------
@dataclass
class SoakState:
    """Everything a soak has seen so far; the report is built from this alone."""

    t0: float = field(default_factory=time.monotonic)
    phase: str = "start-up"
    complete: bool = False
    runs: int = 0
    decisions: int = 0
    timeline: list[dict] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    coverage: Coverage = field(default_factory=Coverage)
    host_used: list[int] = field(default_factory=list)
    host_capacity: list[int] = field(default_factory=list)
    verdict: Verdict = field(default_factory=lambda: Verdict(True, message="all runs agree"))
    replay_path: Path | None = None
    first_s: float | None = None
    interrupted: bool = False
    #: runs broken by a kill_rank we injected: not judged, the soak goes on
    unknown: list[dict] = field(default_factory=list)
    #: a divergence not yet confirmed by replay (kept if the soak is cut while confirming)
    candidate: Schedule | None = None
    #: divergences whose gated replay agreed (file, diagnosis): the hunt goes on past them
    unconfirmed: list[dict] = field(default_factory=list)
    first_unconfirmed: Verdict | None = None
    protocol: dict = field(default_factory=lambda: {"protocol": None, "dp_attention": None})
    #: what could not be written (a full or unwritable --out), one line each
    not_saved: list[str] = field(default_factory=list)
    #: runs cut by a lost agent (kill_agent, or a host that left): in `unknown`, never judged
    lost_runs: int = 0
    #: gated coverage chunks run, and per fault kind the runs (and gated runs) it fired in
    gated_runs: int = 0
    fault_runs: Counter = field(default_factory=Counter)
    fault_gated_runs: Counter = field(default_factory=Counter)
    #: (run number, start) of the run in flight, for the watchdog's progress line
    in_flight: tuple[int, float] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class Soak:
    """One soak: start-up, chunks until the budget is spent, and one `finish()` that settles
    the verdict, completes the report and prints the verdict line on every way out."""

    def __init__(self, cfg: SoakConfig, run_dir: RunDir, seed: int, nem: Any,
                 provenance: dict) -> None:
        self.cfg, self.run_dir, self.seed, self.nem = cfg, run_dir, seed, nem
        self.out = run_dir.path
        self.provenance = provenance
        self.layout = cfg.layout
        self.st = SoakState()
        self.rng = random.Random(seed)
        self.writer = ReportWriter(self.out)
        self.ex: Any = None
        self.mm: Any = None  # the master this soak started (None: none, or the user's)
        self.watchdog: Watchdog | None = None
        self.progress: Progress | None = None
        self.faulted: Any = None  # the nemesis of the run in flight (None: no faults)
        self.free_at_start: int | None = None

    # -- the whole soak ----------------------------------------------------------------------
    def run(self) -> int:
        with ExitStack() as stack, lost_raises() as can_interrupt:
            try:
                self._save()  # a report from the first second: complete false, phase start-up
                sh = self.cfg.shard
                of = (f" (shard {sh['shard']} of base seed {sh['base_seed']}, layout "
                      f"{self.cfg.layout})" if sh else "")
                print(f"cpcheck soak: seed {self.seed}{of}; writing to {self.out}",
                      file=sys.stderr, flush=True)
                self._start(stack, can_interrupt)
                self._loop()
            except InfrastructureLost:
                self._on_lost()
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was found, say so, stop
                self._on_interrupt()
            except Exception as e:  # an internal error is no verdict on the system under test
                self._on_error(e)
            return self.finish()

    def _start(self, stack: ExitStack, can_interrupt: bool) -> None:
        from scenarios.nemesis.mooncake_session import mooncake_for
        from scenarios.store.report import native_stderr_to
        from scenarios.sut import executor_for
        from scenarios.sut.reference_executor import Executor

        cfg = self.cfg
        self._phase("start-up: loading plots")
        ReportWriter.load_plotting()
        if cfg.backend == "mooncake" and not cfg.verbose:  # its log goes to the run dir
            stack.enter_context(native_stderr_to(self.out / "mooncake.log"))
        self._phase("start-up: Mooncake master")
        master, self.mm = stack.enter_context(mooncake_for(cfg.backend, cfg.mooncake_master,
                                                           log_dir=self.out))
        if self.nem is not None and self.mm is not None:
            self.nem.attach_master(self.mm)
        self._phase("start-up: workers")
        if is_sglang(cfg.sut):  # a release: its own pools, under torchrun
            self.ex = stack.enter_context(executor_for(cfg.sut, timeout_s=cfg.timeout,
                                                       mooncake_master=master))
        else:
            links = self.nem is not None and self.nem.needs_links  # network faults
            self.ex = stack.enter_context(Executor(cfg.mode, **cfg.pool_options,
                                                   **({"proxy_hosts": True} if links else {}),
                                                   timeout_s=cfg.timeout,
                                                   mooncake_master=master, device=cfg.device))
        self.watchdog = Watchdog(self._check_in_flight, self._waiting_on, can_interrupt)
        self.watchdog.start()
        stack.callback(self.watchdog.stop)
        self.progress = Progress(cfg.budget_s)
        self.st.t0 = time.monotonic()  # start-up is not part of the budget
        self._phase("running")

    def _loop(self) -> None:
        self._disk_at_start()
        while self.cfg.goes_on(self.st.elapsed(), self.st.runs - len(self.st.unknown)):
            if stop_requested.is_set():  # a signal whose exception was swallowed somewhere
                raise KeyboardInterrupt
            low = self._disk_low()
            if low:
                self.st.verdict = Verdict.unknown(low)
                return
            if self._chunk():
                break
        st = self.st
        if st.runs == len(st.unknown) and st.verdict.status == "agree":  # nothing was judged
            st.verdict = Verdict.unknown(
                f"no run was judged within the {self.cfg.budget_s:.0f} s budget "
                f"({st.runs} run(s), {len(st.unknown)} cut by an injected kill or a lost "
                f"agent)")

    # -- one chunk ---------------------------------------------------------------------------
    def _chunk(self) -> bool:
        """Draw, run, account and judge one chunk; True when the soak must stop."""
        s, gated = soak_chunk(self.rng, self.st.runs, self.layout, self.cfg.variant,
                              self.cfg.backend, make_chunk, self.st.coverage)
        if self.cfg.protocol_changes:
            s = s.with_(**self.cfg.protocol_changes)
        if is_sglang(self.cfg.sut):  # the release's own protocol, MHA pools
            s = s.with_(sut=self.cfg.sut, cache={**s.cache.model_dump(), "mla": False})
            self.st.protocol.update(protocol=self.cfg.sut, dp_attention=s.dp_attention)
        else:
            # what really runs: an alias variant (tp_only_sync) names its own profile
            profile, dp = effective_configuration(s.protocol, s.dp_attention, s.variant)
            self.st.protocol.update(protocol=profile.name, dp_attention=dp)
        results, v, fired, run_s = self._run(s, gated)
        self._account(s, results, v, fired, run_s, gated)
        broke = self._infrastructure()
        if broke:
            self.st.verdict = Verdict.unknown(f"{broke}; the run said: {v.summary()}")
            stop_requested.set()  # no graceful close of clients whose master is gone
            return True
        if v.status == "agree":
            self._save()
            return False
        return self._judge(s, results, v)

    def _run(self, s: Schedule, gated: bool) -> tuple[list[RankResult], Verdict, dict, float]:
        """Run one chunk under the nemesis, gated or not: a gated chunk's IO timing is
        scripted, yet delays, kills, restarts and storage errors all act in it (the storage
        errors it meets are scripted into its replay, see `_confirm`)."""
        from scenarios.judge.judging import run_checked

        nem = self.nem
        before = nem.counts() if nem else {}
        self.faulted = nem
        if self.faulted:
            self.faulted.begin_run(self.layout_world, run=self.st.runs + 1, gated=gated)
        t = time.monotonic()
        self.st.in_flight = (self.st.runs + 1, t)
        try:
            results, v = run_checked(self.ex, s, gated=gated, nemesis=self.faulted)
        finally:
            self.st.in_flight = None
            if self.faulted:
                self.faulted.end_run()
        fired = {k: n - before.get(k, 0) for k, n in (nem.counts() if nem else {}).items()}
        return results, v, fired, time.monotonic() - t

    @property
    def layout_world(self) -> int:
        from scenarios.core.layout import Layout

        return Layout.parse(self.layout).world_size

    def _account(self, s: Schedule, results: list[RankResult], v: Verdict, fired: dict,
                 run_s: float, gated: bool = False) -> None:
        st = self.st
        st.runs += 1
        st.gated_runs += gated
        if gated:
            st.fault_gated_runs.update(k for k, n in fired.items() if n)
        n_dec = int(v.stats.get("decisions", 0))
        st.decisions += n_dec
        st.outcomes.update(_prefetch_outcomes(results))
        st.coverage.add(s, results, fired)
        st.host_used.append(_host_used(results))
        st.host_capacity.append(s.cache.host_pages * s.cache.page_size)
        st.fault_runs.update(k for k, n in fired.items() if n)
        elapsed = st.elapsed()
        st.timeline.append({"t": round(elapsed, 3), "runs": st.runs, "decisions": st.decisions,
                            "decisions_per_s": round(st.decisions / elapsed, 1),
                            "run_decisions_per_s": round(n_dec / run_s, 1) if run_s else 0.0,
                            "faults_in_run": sum(fired.values())})
        if self.progress is not None:
            self.progress.update(elapsed, st.runs, st.decisions, self.nem.total() if self.nem
                                 else 0)

    def _judge(self, s: Schedule, results: list[RankResult], v: Verdict) -> bool:
        """A run that did not agree: a kill we asked for, an unknown, or a divergence."""
        st = self.st
        killed = self.faulted.explain() if self.faulted else None
        lost = getattr(self.ex, "lost_agent", "") if v.status == "unknown" else ""
        if killed or lost:  # a kill asked for, or a host that left: record, go on
            entry = {"run": st.runs, "t": round(st.elapsed(), 3),
                     "diagnosis": (f"{killed} (an injected kill)" if killed else lost)
                     + ": the run is not judged", "error": v.summary()[:300]}
            if lost or (killed and "agent of node" in killed):
                st.lost_runs += 1
                entry["lost_agent"] = True
            st.unknown.append(entry)
            self._save()
            return False
        if v.status == "unknown":
            st.verdict = v
            return True
        return self._confirm(s, results, v)

    def _confirm(self, s: Schedule, results: list[RankResult], v: Verdict) -> bool:
        """Replay a divergence once; True (stop) if it reproduces or too many did not."""
        from scenarios.judge.judging import confirm

        st = self.st
        st.first_s = st.elapsed()
        rep = s
        if results and all(r.recorded is not None for r in results):
            rep = s.with_(choices={r.rank: list(r.recorded.choices) for r in results},
                          faults={r.rank: [list(f) for f in r.recorded.faults] for r in results})
        elif any(r.injected_faults for r in results):  # a gated chunk the nemesis failed calls in
            rep = s.with_(faults={r.rank: [list(f) for f in s.faults.get(r.rank, [])]
                                  + [list(f) for f in r.injected_faults] for r in results})
        st.verdict, st.candidate = v, rep  # kept even if interrupted while confirming
        self._phase("confirming a divergence")
        st.verdict = confirm(self.ex, rep, v)  # a divergence is replayed once before it counts
        self._phase("running")
        path = self._keep_replay(rep, st.verdict)
        st.candidate = None
        if st.verdict.status == "diverge":
            st.replay_path = path
            return True
        # not reproduced (the run read IO state its recording could not pin): keep the file,
        # say so, and hunt on for a divergence that replays
        st.unconfirmed.append({"run": st.runs, "t": round(st.elapsed(), 3),
                               "file": str(path) if path else None,
                               "diagnosis": st.verdict.diagnosis})
        st.first_unconfirmed = st.first_unconfirmed or st.verdict
        st.verdict = Verdict(True, message="all runs agree")
        self._save()
        return len(st.unconfirmed) >= MAX_UNCONFIRMED

    def _keep_replay(self, s: Schedule, verdict: Verdict) -> Path | None:
        """The replay file: printed on stderr first (a full disk loses nothing), then written;
        None if it could not be written (said, and listed in `not_saved`)."""
        from scenarios.store.replay import replay_data, replay_name, write_replay

        data = replay_data(s, verdict, self.cfg.mode,
                           confirmation=verdict.stats.get("confirmation"))
        if verdict.status == "diverge":
            print(f"DIVERGE [{verdict.invariant}]: {verdict.message}", file=sys.stderr)
            print(f"replay file {replay_name(s, verdict)}:\n"
                  f"{json.dumps(data, indent=1, default=str)}", file=sys.stderr, flush=True)
        self._phase("writing the replay file")
        try:
            return write_replay(s, verdict, self.out, self.cfg.mode, data=data)
        except OSError as e:
            self._not_saved(replay_name(s, verdict), e)
            return None
        finally:
            self._phase("running")

    # -- infrastructure ------------------------------------------------------------------------
    def _infrastructure(self) -> str:
        """What broke outside the system under test and was not asked for ("" if nothing):
        checked after every run, agree or not. The run is `unknown` and the soak stops."""
        if self.watchdog is not None and self.watchdog.lost:
            return self.watchdog.lost
        lost = self._master_lost()
        if lost:
            return lost
        return ""

    def _master_lost(self) -> str:
        mm, cfg = self.mm, self.cfg
        if mm is not None and not mm.running and not mm.restarting:
            asked = ("with" if self.nem is not None and "master_restart" in self.nem.kinds
                     else "without")
            return (f"the soak's Mooncake master (pid {mm.pid}) is gone, {asked} a "
                    f"master_restart fault asked; log: {mm.log_path}")
        if cfg.backend == "mooncake" and cfg.mooncake_master:
            from scenarios.nemesis.mooncake_master import (
                MooncakeMasterError,
                check_master_reachable,
            )

            try:
                check_master_reachable(cfg.mooncake_master, timeout=2.0)
            except MooncakeMasterError as e:
                return f"Mooncake master lost: {e}"
        return ""

    def _check_in_flight(self) -> str:
        """The watchdog's check: only while a run is in flight (after it, `_infrastructure`)."""
        return self._master_lost() if self.st.in_flight is not None else ""

    def _waiting_on(self) -> str | None:
        flight = self.st.in_flight
        if flight is None or time.monotonic() - flight[1] < 5.0:
            return None
        master = ""
        if self.mm is not None:
            master = f"; master pid {self.mm.pid} {'up' if self.mm.running else 'DOWN'}"
        return (f"run {flight[0]} in flight for {time.monotonic() - flight[1]:.0f} s, waiting on "
                f"its {self.layout_world} ranks ({self.cfg.mode}, timeout {self.cfg.timeout:g} "
                f"s per wait){master}")

    def _disk_at_start(self) -> None:
        """A disk already low when the soak starts: said once, and the soak runs on (there is
        no report room to keep; a divergence is printed in full before any write)."""
        self.free_at_start = free_bytes(self.out)
        if self.free_at_start is not None and self.free_at_start < LOW_DISK_BYTES:
            self._not_saved("space", OSError(28, f"disk low on --out at the start "
                                                 f"({_mib(self.free_at_start)} free)"))

    def _disk_low(self) -> str:
        """Checked before each run: a disk that falls below LOW_DISK_BYTES during the soak
        (its own logs, a neighbour) would soon leave its findings unsaved. No new run starts;
        the soak ends `unknown` while there is still room for its report ("" if not low)."""
        free = free_bytes(self.out)
        if free is None or free >= LOW_DISK_BYTES:
            return ""
        if self.free_at_start is not None and self.free_at_start < LOW_DISK_BYTES:
            return ""  # low from the start: said then
        return (f"disk low on --out ({_mib(free)} free, below {_mib(LOW_DISK_BYTES)}): no new "
                f"run started after run {self.st.runs}; everything found so far is kept")

    # -- ways out ------------------------------------------------------------------------------
    def _on_lost(self) -> None:
        st = self.st
        diagnosis = (self.watchdog.lost if self.watchdog and self.watchdog.lost
                     else "infrastructure lost")
        self._kill_master()
        # the way out must not wait on clients of a dead master (closing one retries for
        # seconds): leave them to die with the process, as after Ctrl-C
        stop_requested.set()
        st.verdict = Verdict.unknown(f"{diagnosis} (while run {st.runs + 1} was in flight)")

    def _on_interrupt(self) -> None:
        st = self.st
        st.interrupted = True
        self._kill_master()
        if st.candidate is not None and st.replay_path is None:
            v = st.verdict
            st.verdict = Verdict.unknown(f"interrupted before the divergence was confirmed by "
                                         f"replay: {v.summary()}", invariant=v.invariant,
                                         failures=v.failures, stats=v.stats)
            st.replay_path = self._keep_replay(st.candidate, st.verdict)

    def _on_error(self, e: Exception) -> None:
        """Bad input found at start-up stays exit 2 (after the report says where it stopped);
        anything else is `unknown`: infrastructure by its type, else an internal error."""
        from scenarios.core.contract import classify

        code, line = classify(e)
        if code == ExitCode.USAGE and self.st.runs == 0:
            self.st.complete = True
            self._save(plots=False)
            self.run_dir.release()
            raise e
        if not line.startswith("internal error"):
            print(f"cpcheck: cannot judge here: {line}", file=sys.stderr, flush=True)
        self.st.verdict = Verdict.unknown(line)
        if self.cfg.verbose:
            import traceback

            traceback.print_exc()

    def _kill_master(self) -> None:
        if self.mm is not None:  # its data is not needed any more: no grace period
            self.mm.kill_now()

    def finish(self) -> int:
        """Settle the verdict, complete the report, print the verdict line; the exit code."""
        st = self.st
        with suppress(ValueError):  # the watchdog may not interrupt the way out
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.progress is not None:
            self.progress.close()
        if st.verdict.status == "agree" and st.first_unconfirmed is not None:
            st.verdict = st.first_unconfirmed  # found, never reproduced: unknown, with its file
            f = st.unconfirmed[0]["file"]
            st.replay_path = Path(f) if f else None
        st.complete = True
        try:  # the report and the verdict line first, the slower plots last
            self._save(plots=False)
        finally:
            self._print_verdict()
            # after Ctrl-C the plots stay as last drawn (at most PLOT_EVERY_S old): stop in 3 s
            if not (st.interrupted and self.writer.plotted):
                self._save_plots()
            self.run_dir.release()
        if st.interrupted and st.verdict.status == "agree":
            return int(ExitCode.INTERRUPTED)
        return int(STATUS_EXIT[st.verdict.status or "unknown"])

    # -- the report ----------------------------------------------------------------------------
    def report(self) -> SoakReport:
        """The one place the report is built (written after every chunk and at the end)."""
        st, cfg, nem = self.st, self.cfg, self.nem
        elapsed = st.elapsed()
        counts = nem.counts() if nem else {}
        return SoakReport(
            complete=st.complete, phase=st.phase, provenance=self.provenance,
            run_dir=str(self.out), sut=cfg.sut, layout=self.layout, variant=cfg.variant,
            backend=cfg.backend,
            mode=getattr(self.ex, "mode", cfg.mode), **st.protocol, seed=self.seed,
            minutes=cfg.minutes, runs=st.runs,
            decisions=st.decisions, seconds=round(elapsed, 2),
            decisions_per_s=round(st.decisions / elapsed, 1) if elapsed else 0.0,
            runs_per_s=round(st.runs / elapsed, 2) if elapsed else 0.0,
            faults=counts, fault_runs=self._fault_runs(),
            # asked for but never landed in a run: the soak did not test what its flags say
            faults_never_fired=sorted(k for k, n in counts.items() if n == 0),
            status=st.verdict.status or "unknown", verdict=st.verdict.to_dict(),
            seconds_to_divergence=st.first_s,
            confirmed_by_replay=st.verdict.stats.get("confirmed_by_replay"),
            interrupted=st.interrupted, unknown_runs=st.unknown, lost_runs=st.lost_runs,
            unconfirmed_divergences=st.unconfirmed,
            unknown_diagnoses=[u["diagnosis"] for u in st.unknown[:20]],
            fault_events=list(nem.events) if nem else [],
            replay=str(st.replay_path) if st.replay_path else None, not_saved=st.not_saved,
            prefetch_outcomes=dict(st.outcomes), coverage=st.coverage.to_dict(),
            timeline=st.timeline, host_used=st.host_used, shard=cfg.shard)

    def _fault_runs(self) -> dict:
        """Per kind, the runs it fired in, their share of all runs, and how many of them were
        gated coverage chunks (every run, gated or not, draws a fault plan)."""
        st = self.st
        if self.nem is None:
            return {}
        return {"runs": st.runs, "gated_runs": st.gated_runs,
                "by_kind": {k: {"runs": st.fault_runs.get(k, 0),
                                "share": round(st.fault_runs.get(k, 0) / st.runs, 3)
                                if st.runs else 0.0,
                                "gated_runs": st.fault_gated_runs.get(k, 0)}
                            for k in self.nem.kinds}}

    def _phase(self, phase: str) -> None:
        """Enter `phase`; report.json says it at once (a soak killed in it says where)."""
        if phase != self.st.phase:
            self.st.phase = phase
            self._save(plots=False)

    def _save(self, plots: bool | None = None) -> None:
        """report.json now, the plots when due; what cannot be written is said, not fatal."""
        try:
            self.writer.write_report(self.report())
        except OSError as e:
            self._not_saved("report.json", e)
        if plots is not False and self.writer.plots_due(plots):
            self._save_plots()

    def _save_plots(self) -> None:
        st = self.st
        extra: dict = {"coverage.png": st.coverage.plot}
        if self.nem is not None:
            from scenarios.nemesis.faults import KINDS
            from scenarios.store.plots_thinned import plot_faults

            extra["faults.png"] = lambda path: plot_faults(path, list(self.nem.events),
                                                           st.elapsed(), KINDS)
        try:
            self.writer.write_plots(st.timeline, st.outcomes, st.host_used, extra,
                                    st.host_capacity)
        except OSError as e:
            self._not_saved("plots", e)
        except Exception as e:  # plots are a view of report.json, never worth a verdict
            print(f"cpcheck: warning: plots not written: {type(e).__name__}: {e}",
                  file=sys.stderr)

    def _not_saved(self, what: str, e: OSError) -> None:
        line = f"{what}: {e.strerror or e}"
        if any(x.startswith(f"{what}:") for x in self.st.not_saved):
            return
        self.st.not_saved.append(line)
        print(f"cpcheck: warning: could not save {line} (in {self.out}); the verdict stands",
              file=sys.stderr, flush=True)

    # -- the verdict line ----------------------------------------------------------------------
    def _print_verdict(self) -> None:
        """The verdict line, always (also after Ctrl-C, SIGTERM or an internal error)."""
        st, cfg = self.st, self.cfg
        o = sys.stderr if cfg.json else sys.stdout  # stdout carries the JSON object
        rep = self.report()
        print(f"outcome coverage ({rep.runs} runs):\n{st.coverage.table()}", file=o)
        dp = {True: "on", False: "off"}.get(rep.dp_attention, "n/a")  # type: ignore[arg-type]
        print(f"soak sut={rep.sut} layout={rep.layout} variant={cfg.variant} "
              f"protocol={rep.protocol} dp_attention={dp} backend={cfg.backend} mode={rep.mode} "
              f"seed={rep.seed}: {rep.runs} runs, {rep.decisions} decisions "
              f"in {rep.seconds:.1f} s ({rep.decisions_per_s:.0f}/s); faults "
              f"{rep.faults or 'none'}{'; INTERRUPTED' if rep.interrupted else ''}", file=o)
        for line in self._notes(rep):
            print(line, file=o)
        self._print_status(rep, o)
        self._emit_json(rep)

    def _notes(self, rep: SoakReport) -> list[str]:
        notes = []
        fr = rep.fault_runs
        if fr:
            share = ", ".join(f"{k} {v['runs']}/{fr['runs']} ({v['gated_runs']} gated)"
                              for k, v in fr["by_kind"].items())
            notes.append(f"faults met, in runs: {share}; {fr['gated_runs']} of {fr['runs']} "
                         "runs were gated coverage chunks")
        if rep.faults_never_fired:
            notes.append(f"warning: fault(s) asked for but never fired: "
                         f"{', '.join(rep.faults_never_fired)} (runs too short or too few for "
                         "their windows: soak longer)")
        if rep.unknown_runs:
            lost = f", {rep.lost_runs} of them lost an agent" if rep.lost_runs else ""
            notes.append(f"{len(rep.unknown_runs)} run(s) broken by an injected kill or a lost "
                         f"agent were not judged (unknown{lost}): "
                         f"{rep.unknown_runs[0]['diagnosis']}")
        if rep.unconfirmed_divergences and self.st.verdict.status != "unknown":
            u = rep.unconfirmed_divergences
            notes.append(f"{len(u)} divergence(s) did not reproduce on replay (kept, both "
                         f"verdicts in {u[0]['file']}); the soak hunted on")
        if rep.not_saved:
            notes.append(f"NOT SAVED (the verdict stands): {'; '.join(rep.not_saved)}")
        return notes

    def _print_status(self, rep: SoakReport, o: Any) -> None:
        st, report = self.st, self.out / "report.json"
        v = st.verdict
        if v.status == "diverge":
            print(f"DIVERGE [{v.invariant}] after {st.first_s or 0.0:.1f} s: {v.message}", file=o)
            print("confirmed by replay", file=o)
            where = st.replay_path or "(not saved: its contents are on stderr above)"
            print(f"replay: cpcheck replay {where} --mode {self.cfg.mode}", file=o)
        elif v.status == "unknown":
            print(v.summary(), file=o)
            if st.replay_path is not None:
                print(f"not reproduced; both verdicts in {st.replay_path}", file=o)
        elif st.interrupted and st.runs == 0:
            print(f"INTERRUPTED before any run was judged; report: {report}", file=o)
        elif st.interrupted:
            print(f"INTERRUPTED: every run so far agreed; report: {report}", file=o)
        else:
            print(f"AGREE: every run agreed; report: {report}", file=o)
        if v.status != "agree":
            print(f"report: {report}", file=o)

    def _emit_json(self, rep: SoakReport) -> None:
        st, v = self.st, self.st.verdict
        if not self.cfg.json:
            return
        code = (ExitCode.INTERRUPTED if st.interrupted and v.status == "agree"
                else STATUS_EXIT[v.status or "unknown"])
        print(json.dumps({
            "command": "soak", "status": "interrupted" if code == ExitCode.INTERRUPTED else v.status,
            "invariant": v.invariant, "message": v.message, "diagnosis": v.diagnosis,
            "exit_code": int(code), "confirmed_by_replay": v.stats.get("confirmed_by_replay"),
            "replay": str(st.replay_path) if st.replay_path else None,
            "report": str(self.out / "report.json"), "not_saved": rep.not_saved}, default=str),
            flush=True)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# -- the command ---------------------------------------------------------------------------
def run_soak(cfg: SoakConfig) -> int:
    """Check what the CLI could not (exit 2 before any work), claim a fresh run dir, soak.

    The CLI has checked the layout, variant and device already (cli/soak.py)."""
    from scenarios.nemesis.faults import Nemesis
    from scenarios.store.provenance import provenance
    from scenarios.store.report import check_writable

    seed = cfg.seed if cfg.seed is not None else random.randrange(1 << 31)
    nem = Nemesis.parse(cfg.faults, seed=seed)
    nem.nnodes = int(cfg.pool_options.get("nnodes", 1))
    agents = nem.unsupported_agents()
    if agents:
        raise UsageError(agents)
    if "master_restart" in nem.kinds and (cfg.backend != "mooncake" or cfg.mooncake_master):
        raise UsageError("fault 'master_restart' needs a Mooncake master this soak starts "
                         "itself (--backend mooncake without --mooncake-master)")
    if cfg.mode == "torchrun":
        nem.for_torchrun()  # faults act on the real worker processes and the master
    if nem.needs_links:  # say what the network faults reach here, and what they cannot
        from scenarios.runner.netproxy import REACH

        print(f"cpcheck soak: {REACH}", file=sys.stderr, flush=True)
    check_writable(cfg.out)  # before the first run, not after the budget
    run_dir = RunDir.fresh(cfg.out, seed)
    soak = Soak(cfg, run_dir, seed, nem if nem.active else None,
                provenance(list(cfg.argv) or None))
    return soak.run()
