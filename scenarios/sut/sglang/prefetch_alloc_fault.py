"""A Schedule's "prefetch_alloc" fault on SGLang: this rank's host pool refuses the n-th storage
prefetch's host pages (every attempt of it: before and after `evict_host`, and 0.5.11+'s
shorter fallback), as a host pool under pressure on this rank only.

Where a prefetch allocates differs by release (read from the wheels): to 0.5.15 in
`prefetch_from_storage`, before the hit query; from 0.5.16 in the drain
(`_drain_and_alloc_storage_hit`), for the hit count the ranks agreed, one operation per item
taken off `prefetch_hit_queue`. A prefetch counts when it reaches its first host allocation
(one below the threshold, or revoked before allocating, does not), as the reference counts.
"""

from __future__ import annotations

import functools
from typing import Any

from scenarios.sut.sglang.hitqueue import uses_hit_queue


class PrefetchAllocFault:
    def __init__(self, pacer: Any) -> None:
        self.pacer = pacer
        self.count = 0
        self.scope = False  # inside one prefetch's allocation
        self.decided = False
        self.refusing = False

    def begin(self) -> None:
        self.scope, self.decided, self.refusing = True, False, False

    def end(self) -> None:
        self.scope, self.decided, self.refusing = False, False, False

    def alloc(self, orig: Any, *a: Any, **k: Any) -> Any:
        if self.scope and not self.decided:
            self.decided = True
            self.refusing = self.pacer.fail("prefetch_alloc", self.count)
            self.count += 1
        return None if self.refusing else orig(*a, **k)


def install(pacer: Any, cache: Any, cc: Any) -> PrefetchAllocFault:
    """Wrap the host pool's `alloc` and mark each prefetch's allocation scope. Call after the
    driver's and the hit-queue pipeline's hooks (it wraps what they installed)."""
    fault = PrefetchAllocFault(pacer)
    pool = cc.mem_pool_host
    orig_alloc = pool.alloc
    pool.alloc = lambda *a, **k: fault.alloc(orig_alloc, *a, **k)
    if uses_hit_queue(cc):  # 0.5.16+: each operation the drain takes off the hit queue
        q = cc.prefetch_hit_queue
        orig_get = q.get

        def get(*a: Any, **k: Any) -> Any:
            item = orig_get(*a, **k)
            fault.begin()
            return item
        q.get = get
        orig_impl = cache._drain_storage_control_queues_impl

        @functools.wraps(orig_impl)
        def drain_impl(*a: Any, **k: Any) -> Any:
            try:
                return orig_impl(*a, **k)
            finally:
                fault.end()
        cache._drain_storage_control_queues_impl = drain_impl
    else:  # to 0.5.15: the scheduler's prefetch_from_storage
        orig_pfs = cache.prefetch_from_storage

        @functools.wraps(orig_pfs)  # adapters reads its parameter names
        def prefetch_from_storage(*a: Any, **k: Any) -> Any:
            fault.begin()
            try:
                return orig_pfs(*a, **k)
            finally:
                fault.end()
        cache.prefetch_from_storage = prefetch_from_storage
    return fault
