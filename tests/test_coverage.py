"""Outcome coverage: the shaped workload realises each prefetch class it aims for, and the `ci`
Hypothesis profile reaches every prefetch outcome class at least once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from scenarios.checker import check
from scenarios.coverage import PREFETCH_CLASSES, Coverage, prefetch_classes
from scenarios.schedule import Schedule
from scenarios.strategies import schedules
from scenarios.workload import INTENTS, build_prefetch_schedule


@pytest.mark.parametrize("layout", ["1x2", "2x2"])
@pytest.mark.parametrize("policy", sorted(INTENTS))
def test_each_intent_ends_in_its_class(inprocess_executor, layout: str, policy: str) -> None:
    intents = list(INTENTS[policy])
    n = len(intents)
    s = build_prefetch_schedule(layout, policy, intents, shared_len=24, batch_pages=1, mla=False,
                                picks=[[2, 3, 1, 5]] * n, fault_batch=[1] * n,
                                fault_rank=[1] * n)
    results = inprocess_executor.run(s)
    assert check(s, results).ok
    got = prefetch_classes(s, results)
    assert [got.get(f"f{k}") for k in range(n)] == intents


def test_ci_profile_reaches_every_prefetch_class(inprocess_executor) -> None:
    """Budget: the `ci` profile's 60 examples over 1x2 and 2x2 (about 5 s here)."""
    cov = Coverage()

    @settings(settings.get_profile("ci"))
    @given(s=schedules(layouts=("1x2", "2x2")))
    def run(s: Schedule) -> None:
        results = inprocess_executor.run(s)
        cov.add(s, results)
        assert check(s, results).ok

    run()
    assert cov.missing() == [], cov.table()
    assert set(cov.prefetch_shares()) == set(PREFETCH_CLASSES)
