"""Hunt for a failing Schedule with Hypothesis, shrink it, and time how long it took."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, find, settings, target
from hypothesis.errors import NoSuchExample

from scenarios.core.contract import stop_requested
from scenarios.core.records import RankResult
from scenarios.core.schedule import Schedule
from scenarios.core.verdict import Verdict
from scenarios.judge.coverage import Coverage, prefetch_classes
from scenarios.judge.judging import confirm, run_checked
from scenarios.sut import SutExecutor


@dataclass
class Hunt:
    """What one hunt found, on any SUT: the shrunk Schedule and its confirmed verdict."""

    found: Schedule | None
    verdict: Verdict | None  # confirmed by replay, or `unknown` (flaky / not replayable)
    examples: int
    seconds_to_first: float | None
    seconds_total: float
    coverage: Coverage | None = None
    first_n: int | None = None  # the run that first diverged
    first_seen: str | None = None  # its verdict line, whatever the replays say
    best_seen: str | None = None  # the verdict line of the smallest diverging Schedule
    seconds_shrinking: float | None = None
    #: runs that could not be judged (the machine broke them): never agree or diverge
    infra_errors: list[str] = field(default_factory=list)
    infra_schedules: list[Schedule] = field(default_factory=list)
    reproduced: int = 0
    replays: int = 0

    @property
    def steps(self) -> int:
        return len(self.found.ops) if self.found else 0

    @property
    def flaky(self) -> bool:
        """A divergence was seen and never recurred on replay."""
        return self.found is not None and self.reproduced == 0


def interest(results: list[RankResult]) -> dict[str, float]:
    """What makes a run interesting: ranks that disagreed before reducing, revokes, partial
    prefetches. Hypothesis's `target` steers generation towards more of each."""
    disagree = revokes = partial = 0
    for ch in ("scheduler", "prefetch", "prefetch_sync"):
        rows = [r.decisions.get(ch, ()) for r in results]
        for i in range(min((len(x) for x in rows), default=0)):
            if len({x[i].local for x in rows}) > 1:
                disagree += 1
    for d in results[0].decisions.get("prefetch", ()) if results else ():
        revokes += d.outcome == "revoke"
    for d in results[0].decisions.get("scheduler", ()) if results else ():
        if d.kind == "prefetch_done" and d.agreed and d.agreed[0] > 0:
            partial += 1
    return {"local disagreements": float(disagree), "revokes": float(revokes),
            "prefetches with pages": float(partial)}


def steer(results: list[RankResult], s: Schedule | None = None) -> None:
    for label, value in interest(results).items():
        target(value, label=label)
    if s is not None:  # towards runs whose prefetches end in many different ways
        target(float(len(set(prefetch_classes(s, results).values()))),
               label="prefetch outcome classes")


class _Spent(Exception):
    """The shrink budget is spent: keep the smallest failing Schedule seen."""


def observed(ex: Any, s: Schedule, results: list) -> tuple[Schedule, list]:
    """The Schedule and ranks coverage reads: the executor's own choice where it has one (a
    differential run counts on the reference's ranks, which log the prefetch thread's
    agreements SGLang's ranks do not expose), else the run's."""
    pick = getattr(ex, "observed", None)
    return pick(s, results) if pick is not None else (s, results)


def hunt(ex: SutExecutor, strategy: Any, max_examples: int = 200, seed: int = 0, *,
         shrink_s: float | None = None, replays: int = 1) -> Hunt:
    """Generate Schedules from `strategy`, run each on `ex`, shrink the first divergence, then
    confirm the smallest by `replays` replays. One hunt for every SUT; a run that could not be
    judged (infrastructure) counts neither as agree nor as diverge."""
    t0 = time.monotonic()
    state: dict[str, Any] = {"n": 0, "first": None, "best": None}
    seen: dict[str, Verdict] = {}
    out = Hunt(None, None, 0, None, 0.0, Coverage())

    def fails(s: Schedule) -> bool:
        if stop_requested.is_set():  # Ctrl-C / SIGTERM whose exception Hypothesis swallowed
            raise KeyboardInterrupt
        if shrink_s is not None and state["first"] is not None and \
                time.monotonic() - t0 - state["first"] > shrink_s:
            raise _Spent
        state["n"] += 1
        results, v = run_checked(ex, s)
        if v.status == "unknown":  # the machine, not the SUT: never agree or diverge
            out.infra_errors.append((v.diagnosis or "")[:1500])
            out.infra_schedules.append(s)  # kept, to replay what broke the run
            return False
        steer(results, s)
        out.coverage.add(*observed(ex, s, results))
        if v.ok:
            return False
        if state["first"] is None:
            state["first"] = time.monotonic() - t0
            out.first_n, out.first_seen = state["n"], v.summary()[:400]
        seen[s.digest()] = v
        if state["best"] is None or len(s.ops) < len(state["best"].ops):
            state["best"], out.best_seen = s, v.summary()[:400]
        return True

    cfg = settings(max_examples=max_examples, database=None, deadline=None,
                   suppress_health_check=list(HealthCheck), derandomize=False,
                   phases=[Phase.generate, Phase.shrink])
    random.seed(seed)
    try:
        found: Schedule | None = find(strategy, fails, settings=cfg, random=random.Random(seed))
    except NoSuchExample:
        found = None
    except Exception:  # budget spent, or Hypothesis saw a failure that did not recur
        found = state["best"]
        if found is None:
            raise
    out.examples = state["n"]
    out.seconds_to_first = state["first"]
    if found is not None:
        out.seconds_shrinking = time.monotonic() - t0 - state["first"]
        first = seen.get(found.digest()) or run_checked(ex, found)[1]
        out.found, out.verdict = found, confirm(ex, found, first, replays)
        record = out.verdict.stats.get("confirmation") or {}
        out.replays = record.get("replays", 0)
        out.reproduced = record.get("reproduced", int(out.verdict.status == "diverge"))
    out.seconds_total = time.monotonic() - t0
    return out
