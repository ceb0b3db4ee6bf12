"""Decision points where every rank computes the same wrong value, so no cross-rank check sees
it: the ack prefix `writing_check` / `loading_check` agree on, the decision a best-effort
`can_terminate_prefetch` logs without a collective, the drain's record of its agreed counts.

The mutation run's kill command for the decision modules runs this file before the generated
runs (scenarios/campaigns/mutation.py, detector "decision-units"); mutation testing found both
paths unpinned: in-process copies finish before the next check, and every rank logs the same
best-effort record.
"""

from __future__ import annotations

import pytest

from reference.cache_controller import HiCacheAck
from reference.hiradix_cache import _finished_prefix


def _acks(done: list[bool]) -> list[HiCacheAck]:
    acks = []
    for seq, d in enumerate(done):
        ack = HiCacheAck(seq, [seq])
        if d:
            ack._done.set()
        acks.append(ack)
    return acks


@pytest.mark.parametrize("done, seen, count", [
    ([True, True, False, True], 10, 2),  # up to the first unfinished ack, not past it
    ([False, True], 10, 0),
    ([True, True, True], 3, 3),  # every ack the pacer's snapshot has seen
    ([True, True, True], 2, 2),  # seq 2 is not seen yet: finished, but not counted
    ([True, True, True], 0, 0),
    ([], 5, 0),
])
def test_finished_prefix_counts_finished_seen_acks_in_order(done: list[bool], seen: int,
                                                            count: int) -> None:
    assert _finished_prefix(_acks(done), seen) == count


def test_best_effort_termination_logs_what_it_decided() -> None:
    """No collective: the agreed value is the local one, and it reads as "terminate" under the
    agreed path's rule (agreed[0] == 0: no rank waits, or agreed[1] == 1: terminated)."""
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.judging import run_checked
    from scenarios.sut.reference_executor import Executor

    s = load_scenario("prefetch_batches")
    s = s.with_(layout="1x2",
                cache={**s.cache.model_dump(), "prefetch_stop_policy": "best_effort"})
    with Executor("inprocess", timeout_s=5.0) as ex:
        results, verdict = run_checked(ex, s)
    assert verdict.ok, verdict.summary()
    for r in results:
        records = [d for d in r.decisions["scheduler"] if d.kind == "can_terminate"]
        assert records, "the scenario must decide a termination"
        for d in records:
            assert d.local == d.agreed, d
            assert d.outcome == "terminate" and (d.agreed[0] == 0 or d.agreed[1] == 1), d
        # the drain's record names its agreed counts in order: [revoke, backup acks, release]
        drains = [d for d in r.decisions["scheduler"] if d.kind == "drain"]
        assert any(len(set(d.agreed)) > 1 for d in drains), "no drain tells the counts apart"
        for d in drains:
            a = d.agreed
            assert d.outcome == f"revoke {a[0]}, backup acks {a[1]}, release {a[2]}", d
