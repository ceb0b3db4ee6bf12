"""One rank end to end: real IO threads, real storage backends, no collectives.

With one rank there is nobody to agree with, so the sync groups must be empty and no
collective may ever be issued. What is left is the whole L1 -> L2 -> L3 -> L2 -> L1 round trip:
a request computes KV, write-through backs it up to host and storage, everything is evicted, and
a request sharing the prefix must get those pages back from storage byte for byte, with every
slot either held by the tree or free at the end.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from reference.api import CacheConfig, MiniScheduler, ParallelGroups, RankInfo, open_rank
from reference.hashing import page_hashes
from reference.memory_pool import KVShape
from reference.model import page_kv
from reference.pacing import FreeRunning
from reference.storage.base import HiCacheStorage
from reference.storage.file import FileStorage
from reference.storage.memory import MemoryStorage, clear_namespace, namespace_keys

PS = 4
DEADLINE_S = 10.0
BIG = 10**6


class SoloCollectives:
    """Rank 0 of a world of one: groups are never needed and nothing may be reduced."""

    rank = 0

    def __init__(self) -> None:
        self.new_groups_calls: list[tuple[list[tuple[int, ...]], str]] = []
        self.all_reduce_calls = 0

    def new_groups(self, rank_sets: Sequence[tuple[int, ...]], tag: str) -> list[Any]:
        self.new_groups_calls.append((list(rank_sets), tag))
        return []

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        self.all_reduce_calls += 1
        raise AssertionError("a single rank must not issue collectives")


class Store:
    """A storage backend plus a way to list what it holds (for the MLA backup check)."""

    def __init__(self, backend: HiCacheStorage, keys: Callable[[], list[str]]) -> None:
        self.backend = backend
        self.keys = keys


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        ns = f"e2e-{uuid.uuid4().hex}"
        yield Store(MemoryStorage(ns), lambda: namespace_keys(ns))
        clear_namespace(ns)
    else:
        root = tmp_path / "l3"
        backend = FileStorage(root)
        yield Store(backend, lambda: sorted(p.name for p in root.glob("*.kv")))


def new_memory_store() -> Store:
    ns = f"e2e-{uuid.uuid4().hex}"
    return Store(MemoryStorage(ns), lambda: namespace_keys(ns))


def stored_in_l3(tokens: list[int]) -> Store:
    """A fresh memory namespace holding `tokens`' pages, backed up by a rank of its own."""
    store = new_memory_store()
    writer = Rank(CacheConfig(page_size=PS), store.backend)
    try:
        writer.sched.add_request("w", tokens)
        writer.run_until_idle()
    finally:
        writer.sched.shutdown()
    return store


class Rank:
    """One rank's scheduler with the stub collectives, shut down by the test's finally."""

    def __init__(self, config: CacheConfig, storage: HiCacheStorage | None,
                 rank: RankInfo | None = None) -> None:
        self.coll = SoloCollectives()
        self.sched: MiniScheduler = open_rank(
            config, rank or RankInfo(), ParallelGroups(tp=(0,)), self.coll, storage
        )

    def run_until_idle(self) -> None:
        """Step until nothing is queued or in flight; fail rather than hang."""
        end = time.monotonic() + DEADLINE_S
        while True:
            self.sched.step()
            if not self.sched.busy():
                return
            assert time.monotonic() < end, f"still busy after {DEADLINE_S} s: {self.sched.snapshot()}"
            time.sleep(0.002)

    def outcome(self, rid: str):
        (out,) = [o for o in self.sched.outcomes if o.rid == rid]
        return out

    def evict_all(self) -> None:
        self.sched.evict_device(BIG)
        self.run_until_idle()  # write-back eviction queues storage backups that hold host refs
        self.sched.evict_host(BIG)
        snap = self.sched.snapshot()
        assert snap["device_used"] == snap["tree_device_tokens"] == 0
        assert snap["host_used"] == snap["tree_host_tokens"] == 0

    def check_clean(self) -> None:
        snap = self.sched.snapshot()
        assert snap["device_used"] == snap["tree_device_tokens"], snap
        assert snap["host_used"] == snap["tree_host_tokens"], snap
        assert not snap["busy"] and not any(snap["in_flight"].values()), snap
        assert self.sched.cache.cache_controller.thread_errors == []
        assert self.coll.all_reduce_calls == 0
        assert self.coll.new_groups_calls == []  # no sync group for a world of one


def tokens_for(seed: int, pages: int, tail: int = 0) -> list[int]:
    return [seed * 1000 + i for i in range(pages * PS + tail)]


def check_stored_bytes(storage: HiCacheStorage, tokens: list[int], shape: KVShape,
                       tp_rank: int = 0) -> None:
    """What L3 holds under each page's key is the KV the forward pass wrote for that page."""
    for h in page_hashes(tokens, PS):
        want = page_kv(h, shape, PS, tp_rank)
        for i, part in enumerate(shape.parts):
            key = f"{h}_{tp_rank}_{part}" if not shape.is_mla else f"{h}__{part}"
            got = torch.empty_like(want[i])
            assert storage.batch_get([key], [got]) == [True], key
            assert torch.equal(got.view(torch.int16), want[i].contiguous().view(torch.int16))


# -- prefetch stop policies --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["best_effort", "wait_complete", "timeout"])
def test_prefix_comes_back_from_storage(policy: str, store: Store) -> None:
    # a long timeout means "timeout" may only stop early once the IO completed
    cfg = CacheConfig(page_size=PS, device_pages=32, host_pages=64,
                      prefetch_stop_policy=policy, prefetch_timeout_s=60.0)
    rank = Rank(cfg, store.backend)
    try:
        first = tokens_for(1, pages=6, tail=2)
        rank.sched.add_request("r1", first)
        rank.run_until_idle()
        out1 = rank.outcome("r1")
        assert out1.status == "done" and out1.computed == 6 * PS and out1.bad_pages == []
        assert len(store.keys()) == 6 * 2  # six pages, k and v each
        check_stored_bytes(store.backend, first[: 6 * PS], cfg.kv)
        rank.check_clean()

        rank.evict_all()

        shared = 4 * PS
        second = first[:shared] + tokens_for(2, pages=2)
        rank.sched.add_request("r2", second)
        rank.run_until_idle()
        out2 = rank.outcome("r2")
        assert out2.status == "done" and out2.bad_pages == []
        assert out2.device_hit == 0
        assert out2.host_hit + out2.computed == len(second)
        if policy != "best_effort":
            # terminates only once every fetched page landed: the shared prefix is a hit
            assert out2.host_hit == shared and out2.computed == 2 * PS
        assert len(store.keys()) == 8 * 2
        rank.check_clean()

        # and the fetched pages are in the tree now: a third request hits on the device
        rank.sched.add_request("r3", second)
        rank.run_until_idle()
        out3 = rank.outcome("r3")
        assert out3.device_hit == len(second) and out3.computed == 0 and out3.bad_pages == []
        rank.check_clean()
    finally:
        rank.sched.shutdown()


def test_timeout_zero_still_correct(store: Store) -> None:
    """A prefetch that may stop at once inserts only what every page of it really fetched."""
    cfg = CacheConfig(page_size=PS, prefetch_stop_policy="timeout", prefetch_timeout_s=0.0)
    rank = Rank(cfg, store.backend)
    try:
        first = tokens_for(3, pages=5)
        rank.sched.add_request("r1", first)
        rank.run_until_idle()
        rank.evict_all()
        rank.sched.add_request("r2", first)
        rank.run_until_idle()
        out = rank.outcome("r2")
        assert out.status == "done" and out.bad_pages == []
        assert out.host_hit + out.computed == len(first) and out.host_hit % PS == 0
        rank.check_clean()
    finally:
        rank.sched.shutdown()


# -- write policies ----------------------------------------------------------------------------


def test_write_through_selective(store: Store) -> None:
    """Only a node hit `write_through_threshold` times is written to host, then to storage."""
    cfg = CacheConfig(page_size=PS, write_policy="write_through_selective",
                      write_through_threshold=2, prefetch_stop_policy="wait_complete")
    rank = Rank(cfg, store.backend)
    try:
        first = tokens_for(4, pages=4)
        rank.sched.add_request("r1", first)
        rank.run_until_idle()
        assert store.keys() == []  # one hit (its own insert) is below the threshold
        assert rank.sched.snapshot()["host_used"] == 0
        rank.sched.add_request("r2", first)
        rank.run_until_idle()
        assert rank.outcome("r2").device_hit == len(first)
        assert len(store.keys()) == 4 * 2
        check_stored_bytes(store.backend, first, cfg.kv)
        rank.check_clean()

        rank.evict_all()
        second = first[: 3 * PS] + tokens_for(5, pages=1)
        rank.sched.add_request("r3", second)
        rank.run_until_idle()
        out = rank.outcome("r3")
        assert out.bad_pages == [] and out.host_hit == 3 * PS and out.computed == PS
        rank.check_clean()
    finally:
        rank.sched.shutdown()


def test_write_back(store: Store) -> None:
    """Nothing leaves the device until eviction; eviction writes back, then backs up to L3."""
    cfg = CacheConfig(page_size=PS, device_pages=16, write_policy="write_back",
                      prefetch_stop_policy="wait_complete")
    rank = Rank(cfg, store.backend)
    try:
        first = tokens_for(6, pages=4)
        rank.sched.add_request("r1", first)
        rank.run_until_idle()
        assert rank.sched.snapshot()["host_used"] == 0 and store.keys() == []
        rank.evict_all()
        assert len(store.keys()) == 4 * 2
        check_stored_bytes(store.backend, first, cfg.kv)

        second = first[: 2 * PS] + tokens_for(7, pages=2)
        rank.sched.add_request("r2", second)
        rank.run_until_idle()
        out = rank.outcome("r2")
        assert out.bad_pages == [] and out.host_hit == 2 * PS and out.computed == 2 * PS
        rank.check_clean()

        # device pressure: a request larger than the free device pool forces write-back eviction
        big = tokens_for(8, pages=14)
        rank.sched.add_request("r3", big)
        rank.run_until_idle()
        assert rank.outcome("r3").status == "done" and rank.outcome("r3").bad_pages == []
        rank.check_clean()
    finally:
        rank.sched.shutdown()


# -- MLA: replicated over TP, only TP rank 0 backs up ------------------------------------------


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_mla_only_tp_rank_0_backs_up(tp_rank: int) -> None:
    shape = KVShape(is_mla=True, heads=1)
    cfg = CacheConfig(page_size=PS, kv=shape, prefetch_stop_policy="wait_complete")
    store = new_memory_store()
    rank = Rank(cfg, store.backend, RankInfo(tp_rank=tp_rank, tp_size=2))
    try:
        tokens = tokens_for(9, pages=3)
        rank.sched.add_request("r1", tokens)
        rank.run_until_idle()
        assert rank.outcome("r1").bad_pages == []
        hashes = page_hashes(tokens, PS)
        if tp_rank == 0:
            assert sorted(store.keys()) == sorted(f"{h}__k" for h in hashes)
            check_stored_bytes(store.backend, tokens, shape)
        else:
            assert store.keys() == []
        rank.check_clean()
    finally:
        rank.sched.shutdown()
        clear_namespace(store.backend.namespace)  # type: ignore[attr-defined]


# -- a prefetch's anchor node must survive device eviction -------------------------------------


class PrefetchIOGate(FreeRunning):
    """A pacer that holds the prefetch IO thread until the test opens the gate (an Event,
    not a sleep), so a device eviction can run while the prefetch is provably in flight."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.io_waiting = threading.Event()

    def before(self, stream: str, seq: int) -> None:
        if stream == "prefetch_io":
            self.io_waiting.set()
            assert self.open.wait(DEADLINE_S), "gate never opened"

    def release_all(self) -> None:
        self.open.set()


def test_a_prefetch_after_a_device_only_prefix_hangs_from_the_last_host_node() -> None:
    """SGLang's `match_prefix` returns as `last_host_node` the deepest matched node on host,
    and the scheduler prefetches what follows the whole match from it: after a device-only
    prefix (write_through_selective, one hit) the pages are hashed from the root, so the tail
    stored below the head is not found, the prefetch is revoked and no IO runs. (The reference
    once anchored it at the device-only node, whose eviction mid-prefetch then detached the
    fetched pages; that anchor no longer exists.)"""
    head, tail = tokens_for(10, pages=2), tokens_for(11, pages=2)
    store = stored_in_l3(head + tail)
    assert len(store.keys()) == 4 * 2

    gate = PrefetchIOGate()
    cfg = CacheConfig(page_size=PS, device_pages=8, write_policy="write_through_selective",
                      write_through_threshold=3, prefetch_stop_policy="wait_complete")
    coll = SoloCollectives()
    sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), coll, store.backend, pacer=gate)
    rank = Rank.__new__(Rank)
    rank.coll, rank.sched = coll, sched
    try:
        sched.add_request("r1", head, storage_prefetch=False)
        rank.run_until_idle()
        assert sched.snapshot()["host_used"] == 0  # head is device-only, not backed up
        m = sched.cache.match_prefix(head + tail)
        assert m.device_indices.numel() == len(head)
        assert m.last_host_node is sched.cache.tree.root  # not head's device-only node

        sched.add_request("r2", head + tail)  # its tail hashed from the root: a miss
        rank.run_until_idle()
        assert not gate.io_waiting.is_set()  # revoked: no batch ever reached the IO gate
        rank.check_clean()
        out = rank.outcome("r2")
        assert out.status == "done" and out.bad_pages == []
        assert out.device_hit == len(head) and out.host_hit == 0 and out.computed == len(tail)
    finally:
        gate.open.set()
        sched.shutdown()
        clear_namespace(store.backend.namespace)  # type: ignore[attr-defined]
