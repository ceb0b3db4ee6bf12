"""What a rank writes through to host and backs up to storage, as SGLang decides it.

Three causes of the differential's `storage_set_keys` (0.5.11 / 0.5.13 wrote other pages to
storage than the reference), each read from the releases' `hiradix_cache.py`:
SGLang counts write-through hits in `insert` (`_inc_hit_count`), not in `match_prefix`;
`write_backup` skips a node whose parent is not on host; from 0.5.13 a node split while its
write-through is in flight backs up every page the write covered (`_concat_split_chain`).
Also here: a load is one pacer unit per layer (SGLang records a load event per layer), and
the forward's wait for its loads is not what a `loading_check` counts.
"""

from __future__ import annotations

import threading

import pytest

from reference.api import (
    CacheConfig,
    FreeRunning,
    ParallelGroups,
    RankInfo,
    clear_namespace,
    open_rank,
    page_hashes,
)
from scenarios.client.gates import GatedPacer
from tests.test_single_rank_e2e import (
    DEADLINE_S,
    PS,
    Rank,
    SoloCollectives,
    new_memory_store,
    tokens_for,
)


def _rank(cfg: CacheConfig, pacer, store) -> Rank:  # noqa: ANN001
    rank = Rank.__new__(Rank)
    rank.coll = SoloCollectives()
    rank.sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), rank.coll, store.backend,
                           pacer=pacer)
    return rank


def _stored_pages(store) -> set[str]:  # noqa: ANN001
    """The page hashes storage holds (every part of a page is written together)."""
    held: list[str] = store.keys()
    return {k.split("_")[0] for k in held}


def test_write_through_hits_are_counted_at_insert_not_at_match() -> None:
    """write_through_selective, threshold 2: a request's own insert is one hit, and matching a
    prefix counts none; the second insert of the same pages writes them."""
    store = new_memory_store()
    cfg = CacheConfig(page_size=PS, write_policy="write_through_selective",
                      write_through_threshold=2)
    rank = _rank(cfg, FreeRunning(), store)
    try:
        first = tokens_for(20, pages=2)
        rank.sched.add_request("r1", first, storage_prefetch=False)
        rank.run_until_idle()
        for _ in range(3):
            rank.sched.cache.match_prefix(first)
        assert rank.sched.snapshot()["host_used"] == 0  # matches are no hits
        rank.sched.add_request("r2", first, storage_prefetch=False)
        rank.run_until_idle()
        assert rank.sched.snapshot()["host_used"] == len(first)  # two inserts: written
        rank.check_clean()
    finally:
        rank.sched.shutdown()
        clear_namespace(store.backend.namespace)  # type: ignore[attr-defined]


def test_a_split_counts_a_hit_on_the_shared_upper_node() -> None:
    """SGLang's insert splits a node and counts a hit on the upper part (which inherits the
    node's count) and on the new leaf: with threshold 2 the shared page is written, the two
    tails are not."""
    store = new_memory_store()
    cfg = CacheConfig(page_size=PS, write_policy="write_through_selective",
                      write_through_threshold=2)
    rank = _rank(cfg, FreeRunning(), store)
    try:
        a, b, c = tokens_for(21, 1), tokens_for(22, 1), tokens_for(23, 1)
        rank.sched.add_request("r1", a + b, storage_prefetch=False)
        rank.run_until_idle()
        rank.sched.add_request("r2", a + c, storage_prefetch=False)
        rank.run_until_idle()
        assert rank.sched.snapshot()["host_used"] == PS
        assert _stored_pages(store) == {page_hashes(a, PS)[0]}
        rank.check_clean()
    finally:
        rank.sched.shutdown()
        clear_namespace(store.backend.namespace)  # type: ignore[attr-defined]


def test_a_node_whose_parent_is_not_on_host_is_not_written_through() -> None:
    """write_through: the parent's write finds no host memory (a host_alloc fault on the
    first two write_backup calls), so its child is skipped: SGLang keeps backed-up nodes a
    contiguous prefix from the root."""
    store = new_memory_store()
    pacer = GatedPacer(0, [], [("host_alloc", 0), ("host_alloc", 1)], wait_timeout_s=DEADLINE_S)
    rank = _rank(CacheConfig(page_size=PS), pacer, store)
    try:
        head, tail = tokens_for(24, pages=2), tokens_for(25, pages=2)
        rank.sched.add_request("r1", head, storage_prefetch=False)
        rank.run_until_idle()
        rank.sched.add_request("r2", head + tail, storage_prefetch=False)
        rank.run_until_idle()
        assert rank.sched.cache._write_backups == 3  # head twice (refused), tail (skipped)
        assert rank.sched.snapshot()["host_used"] == 0 and store.keys() == []
        rank.check_clean()
    finally:
        rank.sched.shutdown()
        clear_namespace(store.backend.namespace)  # type: ignore[attr-defined]


class WriteGate(FreeRunning):
    """Holds the write (device -> host) copies until the test opens the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def before(self, stream: str, seq: int) -> None:
        if stream == "write":
            assert self.open.wait(DEADLINE_S), "gate never opened"

    def release_all(self) -> None:
        self.open.set()


@pytest.mark.parametrize(("protocol", "whole_chain"),
                         [("sglang-0.5.11", False), ("sglang-0.5.13", True)])
def test_a_node_split_while_its_write_is_in_flight(protocol: str, whole_chain: bool) -> None:
    """r1's pages are being written to host when r2 splits their node. The ack names the
    lower part; 0.5.13 backs up every page the write covered (`_concat_split_chain`), 0.5.11
    only the lower part's own (the upper part is on host, so nothing writes it again)."""
    store = new_memory_store()
    gate = WriteGate()
    rank = _rank(CacheConfig(page_size=PS, protocol=protocol), gate, store)
    try:
        a, b, c = tokens_for(26, 1), tokens_for(27, 1), tokens_for(28, 1)
        rank.sched.add_request("r1", a + b, storage_prefetch=False)
        rank.sched.step()
        rank.sched.add_request("r2", a + c, storage_prefetch=False)
        rank.sched.step()  # splits a+b while its write waits at the gate
        assert rank.sched.cache.ongoing_write_through
        gate.open.set()
        rank.run_until_idle()
        ab, ac = page_hashes(a + b, PS), page_hashes(a + c, PS)
        want = {ab[1], ac[1]} | ({ab[0]} if whole_chain else set())
        assert _stored_pages(store) == want
        rank.check_clean()
    finally:
        gate.open.set()
        rank.sched.shutdown()
        clear_namespace(store.backend.namespace)  # type: ignore[attr-defined]


def test_a_load_is_one_pacer_unit_per_layer() -> None:
    """SGLang's `start_loading` records one event per layer on the load stream and acks on the
    last: a choice counts layers, so one more unit of a 2-layer load does not finish it."""
    store = new_memory_store()
    rank = _rank(CacheConfig(page_size=PS), FreeRunning(), store)
    cc = rank.sched.cache.cache_controller
    try:
        layers = cc.mem_pool_host.shape.layers
        assert layers == 2
        host = cc.mem_pool_host.allocator.alloc(PS)
        assert host is not None
        loaded = cc.load(host, node_id=0)
        assert loaded is not None
        device, ack = loaded
        assert (ack.seq, cc.load_seq) == (layers - 1, layers)
        assert ack.wait(DEADLINE_S)  # the loader passed both units
        cc.ack_load_queue.clear()
        cc.mem_pool_device.allocator.free(device)
        cc.mem_pool_host.allocator.free(host)
    finally:
        rank.sched.shutdown()
        clear_namespace(store.backend.namespace)  # type: ignore[attr-defined]


def test_the_forwards_wait_for_its_loads_is_not_a_loading_check_count() -> None:
    """The forward waits for its loads on the device stream; SGLang reads the load events only
    at `loading_check`, so a choice of 0 there sees none finished (a counted wait: all)."""
    for counted, want in ((False, 0), (True, 2)):
        p = GatedPacer(0, [0], [])
        p.release_all()  # no IO thread here: nothing waits at a gate
        p.after("load", 1)
        p.need("load", 1, counted=counted)
        assert p.at("loading_check", "load", 2) == want

