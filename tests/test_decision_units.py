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


class _Alone:
    """The collectives of a rank whose every group is itself: never called."""

    rank = 0


PS = 4  # CacheConfig's page size
HIT = 2 * PS  # the op's agreed storage hits, in tokens


def _can_terminate(policy: str, queried: bool, revoked: bool, io_done: bool, completed: int,
                   elapsed: float, timeout: float, terminated: bool = False) -> bool:
    """One rank, no peers (the agreed value is its own) deciding whether a prefetch stops."""
    import torch

    from reference.api import CacheConfig, ParallelGroups, RankInfo, open_rank
    from reference.cache_controller import PrefetchOperation

    cfg = CacheConfig(page_size=PS, prefetch_stop_policy=policy, prefetch_timeout_s=timeout)
    sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), _Alone())
    try:
        cache = sched.cache
        op = PrefetchOperation(0, "r", torch.empty(0, dtype=torch.int64), [], None,
                               cache.pacer.now() - elapsed)
        op.storage_hit_count = HIT // PS
        op.completed_tokens = completed
        op.revoked, op.io_done = revoked, io_done
        if queried:
            op.query_done.set()
        if terminated:
            op.mark_terminate()
        return cache.can_terminate_prefetch(op)
    finally:
        sched.shutdown()


@pytest.mark.parametrize("policy, queried, revoked, io_done, completed, elapsed, timeout, stop", [
    ("wait_complete", True, False, False, HIT, 0.0, 1.0, True),  # every hit page landed
    ("wait_complete", True, False, False, HIT - PS, 0.0, 1.0, False),  # one page still coming
    ("wait_complete", True, False, False, 0, 0.0, 1.0, False),
    ("wait_complete", False, False, False, HIT, 0.0, 1.0, False),  # hit count not agreed yet
    ("wait_complete", True, True, False, 0, 0.0, 1.0, True),  # revoked: nothing to wait for
    ("wait_complete", True, False, True, PS, 0.0, 1.0, True),  # the IO thread is done
    ("wait_complete", True, False, False, PS, 50.0, 1.0, False),  # no timeout in this policy
    ("timeout", True, False, False, PS, 5.0, 1.0, True),  # waited past the timeout
    ("timeout", True, False, False, PS, 5.0, 1000.0, False),
    ("timeout", True, False, False, HIT, 0.0, 1000.0, True),
    ("timeout", False, False, False, PS, 5.0, 1.0, True),  # the timeout ends any wait
])
def test_can_terminate_prefetch_per_policy(policy: str, queried: bool, revoked: bool,
                                           io_done: bool, completed: int, elapsed: float,
                                           timeout: float, stop: bool) -> None:
    """Cross-rank runs finish the in-process IO before the check and never reach a timeout,
    so when a prefetch may stop is pinned here."""
    assert _can_terminate(policy, queried, revoked, io_done, completed, elapsed,
                          timeout) is stop


@pytest.mark.parametrize("policy", ["wait_complete", "timeout"])
def test_a_terminated_prefetch_stops_whatever_its_progress(policy: str) -> None:
    assert _can_terminate(policy, True, False, False, 0, 0.0, 1000.0, terminated=True)
