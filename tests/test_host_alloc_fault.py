"""The "host_alloc" fault: one rank's host pool refuses a write-through (host memory pressure on
a subset of ranks, which SGLang 0.5.14 names as why `writing_check` may not return early).
No release agrees on whether a write-through found host memory, and neither does the reference:
the fault must make every profile diverge the way its release does (a collective mismatch up to
0.5.13, a write-through never acked from 0.5.14), and the same Schedule without it must agree.
SGLang's own verdicts per release are in scenarios/corpus/sglang/host-alloc-refused-on-one-rank-1x2.json."""

from __future__ import annotations

import pytest

from reference.api import get_profile
from scenarios.core.schedule import Schedule
from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check
from scenarios.nemesis.faults import Nemesis, Window

#: the profiles whose write_acks run agrees without the fault (0.5.10 splits CP peers anyway)
POST_FIX = ("sglang-0.5.11", "sglang-0.5.13", "sglang-0.5.14", "sglang-0.5.20")


@pytest.mark.parametrize("profile", POST_FIX)
def test_a_host_pool_refusal_on_one_rank_diverges_every_profile(inprocess_executor,
                                                                 profile: str) -> None:
    s = load_scenario("write_acks").with_(protocol=profile)
    assert check(s, inprocess_executor.run(s)).ok  # the control
    faulted = s.with_(faults={1: [("host_alloc", 0)]})
    results = inprocess_executor.run(faulted)
    v = check(faulted, results)
    failed = {inv for inv, _ in v.failures}
    assert "tree" in failed, v.summary()  # rank 1 never backed the node up
    if get_profile(profile).writing_check_early_return:  # to 0.5.13: rank 1 returns early
        assert "collectives" in failed, v.summary()  # and rank 0's MIN meets another call
    else:  # 0.5.14+: no desync, as SGLang 0.5.20 itself; MIN(1, 0) never acks rank 0's write
        assert "collectives" not in failed and "leaks" in failed, v.summary()


def test_host_alloc_is_a_schedule_fault_and_other_calls_are_not() -> None:
    s = load_scenario("write_acks").with_(faults={0: [("host_alloc", 3)]})
    assert Schedule.model_validate_json(s.model_dump_json()).faults == {0: [("host_alloc", 3)]}
    with pytest.raises(ValueError):
        load_scenario("write_acks").with_(faults={0: [("host_free", 0)]})


def test_storage_errors_never_refuse_host_memory() -> None:
    """A soak's storage_errors fault fails storage calls only: a host refusal diverges every
    release, so a nightly with storage errors must not inject one unasked."""
    nem = Nemesis.parse("storage_errors", seed=0)
    nem.plan = [Window("storage_errors", 1, 0.0, 60.0, probability=1.0)]
    assert nem.storage_fails(1, "get")
    assert not nem.storage_fails(1, "host_alloc")
