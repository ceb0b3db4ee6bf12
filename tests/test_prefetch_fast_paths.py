"""The prefetch path's shortcuts return exactly what the plain calls do."""

from __future__ import annotations

import torch

from reference.api import (
    CacheConfig,
    KVShape,
    MemoryStorage,
    ParallelGroups,
    RankInfo,
    open_rank,
)


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
