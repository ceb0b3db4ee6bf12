"""Hunt for a failing Schedule with Hypothesis, shrink it, and time how long it took."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample

from scenarios.checker import Verdict, check
from scenarios.executor import Executor
from scenarios.schedule import Schedule
from scenarios.strategies import schedules


@dataclass
class Hunt:
    found: Schedule | None
    verdict: Verdict | None
    examples: int
    seconds_to_first: float | None
    seconds_total: float

    @property
    def steps(self) -> int:
        return len(self.found.ops) if self.found else 0


def hunt(executor: Executor, variant: str, layouts: tuple[str, ...], max_examples: int = 200,
         seed: int = 0, backend: str = "memory") -> Hunt:
    t0 = time.monotonic()
    state: dict = {"n": 0, "first": None, "last": None}

    def fails(s: Schedule) -> bool:
        state["n"] += 1
        v = check(s, executor.run(s))
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
        found = find(schedules(layouts=layouts, variant=variant, backend=backend), fails,
                     settings=cfg, random=random.Random(seed))
        verdict = check(found, executor.run(found))
    except NoSuchExample:
        found, verdict = None, None
    return Hunt(found, verdict, state["n"], state["first"], time.monotonic() - t0)
