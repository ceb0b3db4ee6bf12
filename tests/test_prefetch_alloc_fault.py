"""The "prefetch_alloc" fault: one rank's host pool refuses a storage prefetch's host pages.

No release agrees on whether a prefetch found host memory: to 0.5.15 the refusing rank never
joins its peers' hit-query MIN (as the reference, which allocates in `prefetch_from_storage`),
from 0.5.16 it revokes at the drain while its peers insert. The fault counts prefetches that
reach their host allocation; the same Schedule without it, or with a later count than any
prefetch reaches, agrees. SGLang's verdicts: the replay files named below (soak: pool starts).
"""

from __future__ import annotations

import pytest

from scenarios.core.schedule import Schedule
from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check
from scenarios.nemesis.faults import Nemesis, Window
from scenarios.store.replay import read_replay
from tests.sglang_envs import need, shared
from tests.subprocess_env import REPO

CORPUS = REPO / "scenarios" / "corpus" / "sglang"
REPLAYS = {"0.5.13": "replay-sglang-0.5.13-dpattn-1x2-2da8396b9012.json",
           "0.5.20": "replay-sglang-0.5.20-dpattn-1x2-6411bf9485d5.json"}


def test_a_prefetch_refused_on_one_rank_splits_the_hit_query(inprocess_executor) -> None:
    s = load_scenario("prefetch_batches").with_(protocol="sglang-0.5.13")
    assert check(s, inprocess_executor.run(s)).ok  # the control
    never = s.with_(faults={1: [("prefetch_alloc", 5)]})  # no 6th prefetch: nothing refused
    assert check(never, inprocess_executor.run(never)).ok
    faulted = s.with_(faults={1: [("prefetch_alloc", 0)]})
    v = check(faulted, inprocess_executor.run(faulted))
    assert v.invariant == "collectives" and "prefetch_thread_func" in v.message, v.summary()


def test_prefetch_alloc_is_a_schedule_fault_a_storage_error_window_never_injects() -> None:
    s = load_scenario("prefetch_batches").with_(faults={0: [("prefetch_alloc", 2)]})
    assert Schedule.model_validate_json(s.model_dump_json()).faults == {0: [("prefetch_alloc", 2)]}
    nem = Nemesis.parse("storage_errors", seed=0)
    nem.plan = [Window("storage_errors", 1, 0.0, 60.0, probability=1.0)]
    assert nem.storage_fails(1, "get") and not nem.storage_fails(1, "prefetch_alloc")


@pytest.mark.soak
@pytest.mark.sglang
@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", sorted(REPLAYS))
def test_sglang_keeps_its_prefetch_alloc_verdict(version: str) -> None:
    need(version)
    from scenarios.judge.judging import run_checked

    s, data = read_replay(CORPUS / REPLAYS[version])
    ex = shared(version)
    _, control = run_checked(ex, s.with_(faults={}))
    assert control.status == "agree", control.summary()
    _, v = run_checked(ex, s)
    assert v.invariant == data["expect_by_release"][f"sglang=={version}"], v.summary()


def _gloo_fails() -> None:
    raise RuntimeError("Connection closed by peer")  # raised in tests/, as torch raises it


def test_a_lone_collective_in_an_sglang_thread_is_not_blamed_on_the_harness() -> None:
    """0.5.13's refusing rank leaves its peer's prefetch thread alone in the hit query: the
    recorder re-types gloo's error (CollectiveError, raised in scenarios/), which blame.py
    must judge by its cause, or the release's divergence would read as 125."""
    from scenarios.client.recorder import CollectiveLog
    from scenarios.core.errors import CollectiveError
    from scenarios.sut.sglang import blame

    log = CollectiveLog(typed_errors=True)
    with pytest.raises(CollectiveError) as info, log.typed_errors("all_reduce over g20_[0, 1]"):
        _gloo_fails()
    assert blame.harness_origin(info.value) is None
    # and a harness bug under the same re-typing is still the harness's
    with pytest.raises(CollectiveError) as ours, log.typed_errors("all_reduce over g20_[0, 1]"):
        blame_bug()
    assert blame.harness_origin(ours.value) is not None


def blame_bug() -> None:
    from scenarios.core.errors import ScheduleError
    from scenarios.core.schedule import read_json

    try:
        read_json("/nonexistent/cpcheck.json", "file")  # raises inside scenarios/
    except ScheduleError as e:
        raise RuntimeError("wrapped") from e
