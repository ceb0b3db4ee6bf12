"""A free-running run's recorded choices are what its decisions read, even mid-completion.

An IO thread marks a unit's ack done, then reports `after` to the pacer. A decision point that
records the pacer's count and then reads the acks could see one more finished unit than it
recorded; its replay then opens one unit fewer and can agree where the run diverged (the
soak's `writing_check_local_skip` check turned `unknown` that way about 1 run in 6 under load).
`at` therefore returns the snapshot it recorded and the decision counts no unit past it.
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
from scenarios.gates import RecordingPacer
from tests.test_single_rank_e2e import DEADLINE_S, PS, SoloCollectives, tokens_for


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
