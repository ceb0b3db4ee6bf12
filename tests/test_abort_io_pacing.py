"""An aborted prefetch's IO runs when its gate opens, as SGLang's IO thread does.

SGLang's `release_aborted_request` marks the op terminated and returns; the IO thread still
reads the op's batch (before 0.5.16) and gives the unfilled host pages back after
`_page_transfer`, whenever its gate opens: a later progress check, or the end of the run. The
reference once ran that IO inside the abort, so its next drain released the pages at once
(`release 5` vs SGLang's `release 1`, then `release 4`). A free-running recording counts only
the pages of batches its decisions saw, so its replay releases them at the same drain.
"""

from __future__ import annotations

import threading
import time

from reference.api import CacheConfig, ParallelGroups, RankInfo, clear_namespace, open_rank
from scenarios.client.gates import GatedPacer, RecordingPacer
from tests.test_recording_snapshot import Decisions, _stored_prefix
from tests.test_single_rank_e2e import DEADLINE_S, PS, SoloCollectives


def test_a_storage_io_choice_past_what_is_pending_lets_all_of_it_finish() -> None:
    """SGLang's driver opens storage calls one at a time while its thread waits at a gate: a
    choice of 4 with one batch pending is that batch (the reference took it modulo: none).
    Copy events keep the modulo, on both SUTs."""
    p = GatedPacer(0, [4, 4, 4], [])
    p.release_all()  # no IO thread here: nothing waits at a gate
    assert p.at("prefetch_progress", "prefetch_io", 1) == 1
    assert p.at("drain", "backup", 2) == 2
    assert p.at("writing_check", "write", 1) == 0  # 4 % 2


def _aborted(pacer, protocol: str = "sglang-0.5.13"):  # noqa: ANN001, ANN202
    toks, backend = _stored_prefix(2)
    seen = Decisions()
    sched = open_rank(CacheConfig(page_size=PS, protocol=protocol), RankInfo(),
                      ParallelGroups(tp=(0,)), SoloCollectives(), backend, pacer=pacer,
                      observer=seen)
    sched.add_request("r", toks + [7])  # 2 pages in L3: one IO batch
    assert "r" in sched.cache.ongoing_prefetch
    sched.abort("r")
    return sched, backend, seen


def _releases(seen: Decisions) -> list[tuple[int, int]]:
    """(local, agreed) host-page releases of every drain so far."""
    return [(d.local[2], d.agreed[2]) for d in seen.log if d.kind == "drain"]


def test_an_aborted_prefetch_gives_its_pages_back_when_its_gate_opens() -> None:
    sched, backend, seen = _aborted(GatedPacer(0, [], [], wait_timeout_s=DEADLINE_S))
    cc = sched.cache.cache_controller
    try:
        sched.cache.drain_storage_control_queues()
        assert cc.get_calls == 0 and _releases(seen) == [(0, 0)]  # the IO waits at its gate
        assert sched.busy()
        sched.cache.pacer.drain = True  # the end of the run: every gate opens
        sched.cache.drain_storage_control_queues()
        assert cc.get_calls == 1  # before 0.5.16 the terminated op's batch is still read
        assert _releases(seen)[-1] == (2, 2)
        assert not sched.busy() and sched.snapshot()["host_used"] == 0
    finally:
        sched.shutdown()
        clear_namespace(backend.namespace)


class _IoAfterTheAbort(RecordingPacer):
    """Free-running, but the prefetch IO starts only once the test has aborted the request: on
    a loaded box the IO could otherwise finish first, and the abort would release the filled
    pages itself (another case than the one under test)."""

    def __init__(self) -> None:
        super().__init__(rank=0)
        self.go = threading.Event()

    def before(self, stream: str, seq: int) -> None:
        if stream == "prefetch_io":
            self.go.wait(DEADLINE_S)
        super().before(stream, seq)


def test_a_recording_counts_only_the_released_pages_its_decisions_saw() -> None:
    """Free-running, the IO thread gives the pages back at once; the drain does not count them
    until a decision saw that batch finish (the replay's gate opens no earlier)."""
    pacer = _IoAfterTheAbort()
    sched, backend, seen = _aborted(pacer)
    pacer.go.set()
    cc = sched.cache.cache_controller
    try:
        deadline = time.monotonic() + DEADLINE_S
        while cc.prefetch_ops_finished < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cc.get_calls == 1  # the IO ran, freely; its pages are held, not queued
        assert cc.host_mem_release_queue.qsize() == 0 and cc.prefetch_io_busy()
        sched.cache.drain_storage_control_queues()
        assert _releases(seen) == [(0, 0)] and sched.busy()
        pacer.drain = True
        sched.cache.drain_storage_control_queues()  # records the batch as seen
        assert _releases(seen)[-1] == (2, 2) and not sched.busy()
    finally:
        sched.shutdown()
        clear_namespace(backend.namespace)
