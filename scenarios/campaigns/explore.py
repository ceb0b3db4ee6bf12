"""Hunt for a failing Schedule with Hypothesis, shrink it, and time how long it took."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, find, settings, target
from hypothesis.errors import NoSuchExample

from reference.api import DEFAULT_PROFILE
from scenarios.core.contract import stop_requested
from scenarios.core.records import RankResult
from scenarios.core.schedule import Schedule
from scenarios.core.verdict import Verdict
from scenarios.generate.strategies import schedules
from scenarios.judge.checker import check
from scenarios.judge.coverage import Coverage, prefetch_classes
from scenarios.sut.reference_executor import Executor


@dataclass
class Hunt:
    found: Schedule | None
    verdict: Verdict | None
    examples: int
    seconds_to_first: float | None
    seconds_total: float
    coverage: Coverage | None = None

    @property
    def steps(self) -> int:
        return len(self.found.ops) if self.found else 0


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


def hunt(executor: Executor, variant: str, layouts: tuple[str, ...], max_examples: int = 200,
         seed: int = 0, backend: str = "memory", protocol: str = DEFAULT_PROFILE,
         dp_attention: bool = True) -> Hunt:
    t0 = time.monotonic()
    state: dict = {"n": 0, "first": None, "last": None}
    cov = Coverage()

    def fails(s: Schedule) -> bool:
        if stop_requested.is_set():  # Ctrl-C / SIGTERM whose exception Hypothesis swallowed
            raise KeyboardInterrupt
        state["n"] += 1
        results = executor.run(s)
        steer(results, s)
        cov.add(s, results)
        v = check(s, results)
        if not v.ok:
            if state["first"] is None:
                state["first"] = time.monotonic() - t0
            state["last"] = v
        return not v.ok

    cfg = settings(max_examples=max_examples, database=None, deadline=None,
                   suppress_health_check=list(HealthCheck), derandomize=False,
                   phases=[Phase.generate, Phase.shrink])
    import random

    random.seed(seed)
    try:
        found = find(schedules(layouts=layouts, variant=variant, backend=backend,
                               protocol=protocol, dp_attention=dp_attention), fails,
                     settings=cfg, random=random.Random(seed))
        verdict = check(found, executor.run(found))
    except NoSuchExample:
        found, verdict = None, None
    return Hunt(found, verdict, state["n"], state["first"], time.monotonic() - t0, cov)
