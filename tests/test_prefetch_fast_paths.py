"""The prefetch path's shortcuts return exactly what the plain calls do."""

from __future__ import annotations

import ctypes
import time
from collections import Counter

import torch

from reference.api import (
    CacheConfig,
    KVShape,
    MemoryStorage,
    Observer,
    ParallelGroups,
    RankInfo,
    StorageAccess,
    clear_namespace,
    open_rank,
)
from reference.memory_pool import HostKVPool
from reference.sync import SyncGroup, sync_plan


class _OneRank:
    rank = 0

    def new_groups(self, rank_sets, tag):  # noqa: ANN001, ANN201
        return []

    def all_reduce(self, tensor, op, group):  # noqa: ANN001, ANN201
        raise AssertionError("one rank: no collectives")


def test_host_page_parts_are_the_pool_page_parts() -> None:
    for mla in (False, True):
        cfg = CacheConfig(page_size=4, device_pages=8, host_pages=16,
                          kv=KVShape(is_mla=mla, heads=1 if mla else 2))
        sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), _OneRank(),
                          MemoryStorage(namespace=f"fast-{mla}"))
        try:
            cc = sched.cache.cache_controller
            pool = cc.mem_pool_host
            for idx in (torch.arange(0, 16), torch.tensor([12, 13, 14, 15, 4, 5, 6, 7])):
                for _ in range(2):  # first call fills the view cache, second reads it
                    fast = cc.host_page_parts(idx)
                    plain = pool.page_parts(idx)
                    assert len(fast) == len(plain)
                    for fp, pp in zip(fast, plain, strict=True):
                        assert [(t.data_ptr(), t.shape, t.stride()) for t in fp] == [
                            (t.data_ptr(), t.shape, t.stride()) for t in pp]
        finally:
            sched.shutdown()


def test_page_buffer_meta_is_where_the_page_parts_lie() -> None:
    """The zero-copy addresses are exactly the page-part tensors' memory, in the same order."""
    for mla in (False, True):
        pool = HostKVPool(KVShape(is_mla=mla, heads=1 if mla else 2, layers=3), num_pages=9,
                          page_size=4, pin=False)
        for idx in (torch.arange(0, 36), torch.tensor([32, 33, 34, 35, 4, 5, 6, 7]),
                    torch.arange(8, 12), torch.arange(0, 0)):
            ptrs, sizes = pool.get_page_buffer_meta(idx)
            parts = [t for page in pool.page_parts(idx) for t in page]
            assert ptrs == [t.data_ptr() for t in parts]
            assert sizes == [t.numel() * t.element_size() for t in parts]
            assert all(t.is_contiguous() for t in parts)


class ZeroCopyMemory(MemoryStorage):
    """A MemoryStorage that also reads zero-copy, into registered memory only."""

    zero_copy = True

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self.calls: Counter[str] = Counter()
        self.regions: list[tuple[int, int]] = []

    def register_mem_pool_host(self, buffer: torch.Tensor) -> None:
        self.regions.append((buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
                             * buffer.element_size()))

    def batch_get(self, keys, targets):  # noqa: ANN001, ANN201
        self.calls["batch_get"] += 1
        return super().batch_get(keys, targets)

    def batch_get_into(self, keys, ptrs, sizes):  # noqa: ANN001, ANN201
        self.calls["batch_get_into"] += 1
        out = []
        for key, p, n in zip(keys, ptrs, sizes, strict=True):
            assert any(s <= p and p + n <= e for s, e in self.regions), "outside the pool"
            value = self._table().get(key)
            if value is None or value.numel() != n:
                out.append(False)
                continue
            ctypes.memmove(p, value.data_ptr(), n)
            out.append(True)
        return out


class Accesses(Observer):
    wants_checksums = True

    def __init__(self) -> None:
        self.seen: list[StorageAccess] = []

    def on_storage(self, access: StorageAccess) -> None:
        self.seen.append(access)


def _prefetch_reads(storage: MemoryStorage, observer: Accesses) -> list[StorageAccess]:
    """Write 6 pages through to L3, drop them from device and host, prefetch them back."""
    cfg = CacheConfig(page_size=4, device_pages=16, host_pages=32, prefetch_batch_pages=4,
                      prefetch_stop_policy="wait_complete", kv=KVShape(layers=2, heads=2))
    sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), _OneRank(), storage,
                      observer=observer)
    try:
        tokens = list(range(100, 124))
        for rid, tail in (("write", 1), ("prefetch", 2)):
            sched.add_request(rid, tokens + [tail])
            for _ in range(2000):
                sched.step()
                if not sched.busy():
                    break
                time.sleep(0.002)
            assert not sched.busy()
            sched.evict_device(1 << 30)
            sched.evict_host(1 << 30)
    finally:
        sched.shutdown()
    return [a for a in observer.seen if a.op == "get"]


def test_prefetch_reads_zero_copy_the_same_bytes_as_through_tensors() -> None:
    """With a zero-copy backend the IO thread reads through addresses, never through
    tensors, and lands exactly the bytes the generic path lands (the checksums of the host
    pages after each read, as the recorder sees them)."""
    got = {}
    for zero_copy in (False, True):
        ns = f"zc-{zero_copy}-{time.monotonic_ns()}"
        storage = ZeroCopyMemory(ns) if zero_copy else MemoryStorage(namespace=ns)
        try:
            gets = _prefetch_reads(storage, Accesses())
        finally:
            clear_namespace(ns)
        assert gets and all(all(a.ok) for a in gets)
        got[zero_copy] = [(a.keys, a.checksums) for a in gets]
        if zero_copy:
            assert storage.calls == {"batch_get_into": len(gets)}
    assert got[True] == got[False]
    # the checksums name real bytes: the six pages' K and V, all different
    sums = [s for _, c in got[True] for s in c]
    assert len(sums) == 12 and len(set(sums)) == 12


class _CountingCollectives:
    """Two-rank groups whose all-reduce is this rank's own value (the peer agrees), counted."""

    rank = 0

    def __init__(self) -> None:
        self.all_reduces = 0

    def new_groups(self, rank_sets, tag):  # noqa: ANN001, ANN201
        return [tuple(r) for r in rank_sets]

    def all_reduce(self, tensor, op, group):  # noqa: ANN001, ANN201
        self.all_reduces += 1


def test_single_rank_agreement_skips_only_when_there_is_no_group() -> None:
    """Groups of one rank are dropped from the plan; with none left, a reduce returns the
    local values untouched. Any real group still reduces, once per group."""
    coll = _CountingCollectives()
    alone = SyncGroup(coll, sync_plan(ParallelGroups(tp=(0,))), "hits")
    assert not alone.issues_collectives
    assert alone.reduce([3, 0, 7], "min") == (3, 0, 7) and coll.all_reduces == 0
    assert alone.reduce((True, 2), "max") == (1, 2)
    assert all(type(v) is int for v in alone.reduce((True, 2), "max"))
    pair = SyncGroup(coll, sync_plan(ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0, 2))), "hits")
    assert pair.issues_collectives
    assert pair.reduce([3, 7], "min") == (3, 7) and coll.all_reduces == len(pair.rank_sets) == 2
