"""MiniScheduler: drives one rank's HiRadixCache the way SGLang's scheduler does.

Every rank runs the same requests in the same order (they serve the same batch); what differs
per rank is only how far its IO threads got, which the cache's decision points agree on. A
request: match the prefix, load host hits back to the device, prefetch the rest from storage,
stay in the waiting queue (skipped, never blocking) until its prefetch terminates, then "forward" the uncached pages and cache
the result, which writes it through to host and, after the write ack, backs it up to storage.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from reference.cache_controller import HiCacheError
from reference.hiradix_cache import HiRadixCache
from reference.model import forward_fill, verify_device_pages


@dataclass
class Req:
    rid: str
    tokens: list[int]
    prefetching: bool = False


@dataclass
class RequestOutcome:
    """What one request got; equal across CP peers when they agree."""

    rid: str
    status: str  # "done" | "aborted" | "rejected"
    device_hit: int = 0
    host_hit: int = 0
    computed: int = 0
    bad_pages: list[int] = field(default_factory=list)


class MiniScheduler:
    def __init__(self, cache: HiRadixCache) -> None:
        self.cache = cache
        self.waiting: OrderedDict[str, Req] = OrderedDict()
        self.ready: OrderedDict[str, Req] = OrderedDict()
        self.outcomes: list[RequestOutcome] = []

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    def add_request(self, rid: str, tokens: list[int], storage_prefetch: bool = True) -> None:
        if rid in self.waiting or rid in self.ready:
            raise ValueError(f"duplicate request id {rid}")
        req = Req(rid, list(tokens))
        if storage_prefetch and self.cache.enable_storage:
            m = self.cache.match_prefix(req.tokens)
            hit = m.device_indices.numel() + m.host_hit_length
            req.prefetching = self.cache.prefetch_from_storage(rid, m.last_host_node,
                                                               req.tokens[hit:])
        (self.waiting if req.prefetching else self.ready)[rid] = req

    def abort(self, rid: str) -> None:
        if rid in self.waiting:
            self.waiting.pop(rid)
            self.cache.release_aborted_request(rid)
        elif rid in self.ready:
            self.ready.pop(rid)
        else:
            return
        self.outcomes.append(RequestOutcome(rid, "aborted"))

    def step(self) -> None:
        """One scheduler iteration: agree on finished IO, admit requests, run them."""
        self.cache.check_hicache_events()
        for rid in list(self.waiting):
            if self.cache.check_prefetch_progress(rid):
                self.ready[rid] = self.waiting.pop(rid)
            # else: SGLang skips a request whose prefetch cannot terminate yet and goes on
        while self.ready:
            _, req = self.ready.popitem(last=False)
            self._run(req)

    def _run(self, req: Req) -> None:
        cache = self.cache
        ps = self.page_size
        aligned = len(req.tokens) // ps * ps
        tokens = req.tokens[:aligned]
        m = cache.match_prefix(tokens)
        host_hit = m.host_hit_length
        ack = cache.init_load_back(m.last_host_node, host_hit) if host_hit else None
        if host_hit:
            m = cache.match_prefix(tokens)
        prefix = m.device_indices
        cache.tree.inc_lock_ref(m.last_device_node)
        try:
            need = aligned - prefix.numel()
            new = cache.device_pool.allocator.alloc(need)
            if new is None:
                cache.evict(need)
                new = cache.device_pool.allocator.alloc(need)
            if new is None:
                self.outcomes.append(RequestOutcome(req.rid, "rejected", prefix.numel(), host_hit))
                return
            # the forward waits for every load issued so far (one FIFO load stream, SGLang's
            # consumer index): a prefix may have been loaded by a request that was then
            # rejected. It waits on the device stream: the next `loading_check` may still see
            # the loads' events unfinished (not counted; SGLang reads them only there)
            pending = cache.cache_controller.ack_load_queue
            last = pending[-1] if pending else ack
            if last is not None:
                cache.pacer.need("load", last.seq, counted=False)
                if not last.wait(cache.cfg.agree_timeout_s):
                    raise HiCacheError(f"load ack {last.seq} not finished in time")
            indices = torch.cat([prefix, new])
            forward_fill(cache.device_pool, tokens, indices, prefix.numel(), cache.rank.tp_rank)
            bad = verify_device_pages(cache.device_pool, tokens, indices, cache.rank.tp_rank)
            cache.insert(tokens, indices)
        finally:
            cache.tree.dec_lock_ref(m.last_device_node)
        self.outcomes.append(RequestOutcome(
            req.rid, "done", prefix.numel() - (host_hit if ack is not None else 0),
            host_hit if ack is not None else 0, need, bad,
        ))

    def evict_device(self, num_tokens: int) -> int:
        return self.cache.evict(num_tokens)

    def evict_host(self, num_tokens: int) -> int:
        return self.cache.evict_host(num_tokens)

    def busy(self) -> bool:
        cc = self.cache.cache_controller
        return bool(
            self.waiting or self.ready or any(self.cache.in_flight().values())
            or cc.prefetch_revoke_queue.qsize() or cc.ack_backup_queue.qsize()
            or cc.host_mem_release_queue.qsize() or cc.prefetch_io_busy()
        )

    def snapshot(self) -> dict:
        """Accounting the checker compares: every slot in use is held by the tree or in flight."""
        cache = self.cache
        held = cache.tree.cached_tokens()
        return {
            "tree_digest": cache.tree.digest(),
            "device_used": cache.device_pool.allocator.used_size(),
            "host_used": cache.host_pool.allocator.used_size(),
            "tree_device_tokens": held["device"],
            "tree_host_tokens": held["host"],
            "in_flight": cache.in_flight(),
            "busy": self.busy(),
            "device": str(cache.device_pool.device),
            "host_pinned": bool(cache.host_pool.buffer.is_pinned()),
            "cuda_event_acks": cache.cache_controller.write_stream is not None,
        }

    def shutdown(self) -> None:
        self.cache.shutdown()
