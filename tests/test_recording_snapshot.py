"""A free-running run's recorded choices are what its decisions read, even mid-completion.

An IO thread marks a unit's ack done, then reports `after` to the pacer. A decision point that
records the pacer's count and then reads the acks could see one more finished unit than it
recorded; its replay then opens one unit fewer and can agree where the run diverged (the
soak's `writing_check_local_skip` check turned `unknown` that way about 1 run in 6 under load).
`at` therefore returns the snapshot it recorded and the decision counts no unit past it; the
prefetch progress check reads an op's batches the same way (a batch that landed mid-check once
turned a soak's `terminate` into a replay's `wait`).
"""

from __future__ import annotations

import threading
import uuid

import pytest

from reference.api import (
    CacheConfig,
    Decision,
    MemoryStorage,
    Observer,
    ParallelGroups,
    RankInfo,
    clear_namespace,
    open_rank,
)
from scenarios.client.gates import RecordingPacer
from tests.test_single_rank_e2e import (
    DEADLINE_S,
    PS,
    SoloCollectives,
    stored_in_l3,
    tokens_for,
)


class HeldAfterAck(RecordingPacer):
    """Holds a stream's IO thread between its ack and its `after`: the race window, opened
    on purpose and kept open until the test has read."""

    def __init__(self, stream: str) -> None:
        super().__init__(rank=0)
        self.stream = stream
        self.in_window = threading.Event()
        self.release = threading.Event()

    def after(self, stream: str, seq: int) -> None:
        if stream == self.stream and not self.release.is_set():
            self.in_window.set()
            assert self.release.wait(DEADLINE_S), "the test never closed the window"
        super().after(stream, seq)

    def release_all(self) -> None:
        self.release.set()
        super().release_all()


class Decisions(Observer):
    def __init__(self) -> None:
        self.log: list[Decision] = []

    def on_decision(self, decision: Decision) -> None:
        self.log.append(decision)


@pytest.mark.parametrize("protocol", ["sglang-0.5.20", "sglang-0.5.13"])
def test_writing_check_counts_what_the_pacer_recorded(protocol: str) -> None:
    pacer, seen = HeldAfterAck("write"), Decisions()
    sched = open_rank(CacheConfig(page_size=PS, protocol=protocol), RankInfo(),
                      ParallelGroups(tp=(0,)), SoloCollectives(), None, pacer=pacer,
                      observer=seen)
    cache = sched.cache
    try:
        sched.add_request("r", tokens_for(1, pages=2))
        sched.step()  # the forward pass inserts the pages: one write-through is queued
        assert pacer.in_window.wait(DEADLINE_S), "no write-through reached its ack"
        (ack,) = cache.cache_controller.ack_write_queue
        assert ack.finished(), "the window must hold a finished ack not yet reported"
        cache.writing_check()
        last = [d for d in seen.log if d.kind == "writing_check"][-1]
        assert pacer.choices[-1] == 0  # recorded: no write reported done yet
        assert last.local == (0,), f"the decision read {last.local}, the pacer recorded 0"
        assert cache.cache_controller.ack_write_queue == [ack]  # nothing acted on
    finally:
        pacer.release.set()
        sched.shutdown()


def test_free_running_reads_every_finished_ack() -> None:
    """Without a pacer (production), `at` bounds nothing: every finished ack counts."""
    seen = Decisions()
    sched = open_rank(CacheConfig(page_size=PS), RankInfo(), ParallelGroups(tp=(0,)),
                      SoloCollectives(), None, observer=seen)
    try:
        sched.add_request("r", tokens_for(2, pages=2))
        sched.step()  # events are checked before the forward pass: its write is still queued
        (ack,) = sched.cache.cache_controller.ack_write_queue
        assert ack.wait(DEADLINE_S)
        sched.cache.writing_check()
        assert [d.local for d in seen.log if d.kind == "writing_check"][-1] == (1,)
        assert sched.cache.cache_controller.ack_write_queue == []
    finally:
        sched.shutdown()


def test_drain_counts_backup_acks_the_pacer_recorded() -> None:
    """The drain's backup-ack count obeys the same snapshot (its stream is "backup")."""
    ns = f"snapshot-{uuid.uuid4().hex}"
    pacer, seen = HeldAfterAck("backup"), Decisions()
    sched = open_rank(CacheConfig(page_size=PS), RankInfo(), ParallelGroups(tp=(0,)),
                      SoloCollectives(), MemoryStorage(ns), pacer=pacer, observer=seen)
    cache = sched.cache
    try:
        sched.add_request("r", tokens_for(3, pages=2))
        sched.step()  # forward: a write-through is queued
        (ack,) = cache.cache_controller.ack_write_queue
        assert ack.wait(DEADLINE_S)
        cache.writing_check()  # acks it: the node's backup to storage is queued
        assert pacer.in_window.wait(DEADLINE_S), "no backup reached its ack"
        assert cache.cache_controller.ack_backup_queue.qsize() == 1
        cache.drain_storage_control_queues()
        last = [d for d in seen.log if d.kind == "drain"][-1]
        assert pacer.choices[-1] == 0
        assert last.local[1] == 0, f"the drain read {last.local}, the pacer recorded 0 acks"
        assert cache.cache_controller.ack_backup_queue.qsize() == 1  # still queued
    finally:
        pacer.release.set()
        sched.shutdown()
        clear_namespace(ns)


def _stored_prefix(pages: int) -> tuple[list[int], MemoryStorage]:
    """`pages` pages backed up to a fresh memory namespace by a rank of its own."""
    toks = tokens_for(20, pages=pages)
    store = stored_in_l3(toks)
    assert len(store.keys()) == pages * 2
    return toks, store.backend


@pytest.mark.parametrize(("protocol", "policy"), [("sglang-0.5.20", "wait_complete"),
                                                  ("sglang-0.5.13", "wait_complete"),
                                                  ("sglang-0.5.13", "timeout")])
def test_prefetch_progress_reads_what_the_pacer_recorded(protocol: str, policy: str) -> None:
    """`can_terminate_prefetch` obeys the snapshot too: a batch that landed (its tokens
    counted, `io_done` set) but was not yet reported is not seen. Under `wait_complete` the
    check waits; under `timeout` (0 s: it may stop at once) the frozen count is what it saw."""
    toks, backend = _stored_prefix(2)
    pacer, seen = HeldAfterAck("prefetch_io"), Decisions()
    cfg = CacheConfig(page_size=PS, protocol=protocol, prefetch_stop_policy=policy,
                      prefetch_timeout_s=0.0)
    sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), SoloCollectives(), backend,
                      pacer=pacer, observer=seen)
    cache = sched.cache
    try:
        sched.add_request("r", toks + [7])  # 2 pages in L3: one batch (the default is 2 pages)
        op = cache.ongoing_prefetch["r"].operation
        assert pacer.in_window.wait(DEADLINE_S), "the prefetch batch never landed"
        assert op.completed_tokens == 2 * PS and op.io_done  # landed, not yet reported
        if policy == "wait_complete":
            assert cache.can_terminate_prefetch(op) is False
            last = [d for d in seen.log if d.kind == "can_terminate"][-1]
            assert last.local == (1, 0), f"the check read {last.local}: it saw the batch"
        else:
            assert cache.check_prefetch_progress("r") is True  # stops at once (0 s timeout)
            done = [d for d in seen.log if d.kind == "prefetch_done"][-1]
            assert done.local == (0,), f"froze {done.local} tokens, the pacer saw 0 batches"
        assert pacer.choices[-1] == 0
    finally:
        pacer.release.set()
        sched.shutdown()
        clear_namespace(backend.namespace)


def test_a_recorded_choice_replays_to_the_same_count_when_later_units_finished() -> None:
    """A progress check of an early prefetch op may find a later op's batches finished too.
    The gated replay takes a choice modulo the units the point issued, so a choice counting
    those later batches wrapped around and opened fewer (a soak's `terminate` replayed as
    `wait`). The recorded choice stops at what the point issued."""
    from scenarios.client.gates import GatedPacer

    rec = RecordingPacer(rank=0)
    for seq in range(10):  # ops f5 (batches 0..7) and f6 (8..9): all ten finished
        rec.after("prefetch_io", seq)
    assert rec.at("prefetch_progress", "prefetch_io", 8) == 8  # f5's check
    assert rec.at("prefetch_progress", "prefetch_io", 10) == 10  # f6's
    assert rec.at("prefetch_progress", "prefetch_io", 8) == 10  # f5 again: all seen before
    replay = GatedPacer(0, rec.choices, [])
    replay.release_all()  # no IO thread here: nothing waits at a gate
    got = []
    for issued in (8, 10, 8):
        got.append(replay.at("prefetch_progress", "prefetch_io", issued))
        for seq in range(got[-1]):  # the IO thread catches up with what the point opened
            replay.after("prefetch_io", seq)
    assert got == [8, 10, 10]
