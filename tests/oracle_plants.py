"""Bugs planted for the oracle's tests: each keeps every rank in agreement, so only the oracle
can see it. Test-local patches (never named variants); also a torchrun job that plants one
inside the workers, since a monkeypatch in the test process does not reach them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

from reference import cache_controller as cache_controller_module
from reference.cache_controller import HiCacheController
from reference.hiradix_cache import HiRadixCache
from reference.radix_tree import RadixTree
from reference.sync import SyncGroup
from scenarios.sut import reference_rank as rank_run

_reduce = SyncGroup.reduce
_cache_config = rank_run.cache_config
_writing_check = HiRadixCache.writing_check
_ack_writes = HiRadixCache._ack_writes
_release_prefetch = HiRadixCache._release_prefetch


def _flip(tag: str, frm: str, to: str, width: int | None = None):  # noqa: ANN202
    """Reduce with `to` instead of `frm` on the `tag` groups (only vectors of `width` values:
    `control` also carries the abort barrier, a one-value MAX that must stay as it is)."""
    def reduce(self: SyncGroup, values: Any, op: str = "min") -> tuple[int, ...]:
        hit = self.tag == tag and op == frm and (width is None or len(values) == width)
        return _reduce(self, values, to if hit else op)
    return reduce


def _config(**changes: Any):  # noqa: ANN202
    def cache_config(s: Any, env: Any) -> Any:
        return dataclasses.replace(_cache_config(s, env), **changes)
    return cache_config


def _writing_check_one_short(self: HiRadixCache, write_back: bool = False,
                             ready: tuple[int, int] | None = None) -> None:
    """reference/'s writing_check itself, except that the agreed branch pops one ack fewer
    than agreed (when it agreed on 2 or more); write-back eviction is left alone."""
    if write_back:
        return _writing_check(self, write_back)

    def ack_writes(n: int) -> tuple[int, int]:
        return _ack_writes(self, n - 1 if n >= 2 else n)  # the bug

    self._ack_writes = ack_writes  # type: ignore[method-assign]
    try:
        return _writing_check(self, write_back, ready)
    finally:
        del self._ack_writes


def _release_one_page_short(self: HiRadixCache, info: Any, keep_tokens: int) -> None:
    return _release_prefetch(self, info, max(keep_tokens - self.page_size, 0))


def _terminate_always(self: HiRadixCache, op: Any) -> bool:
    """can_terminate_prefetch that logs the agreed decision but stops whatever it says."""
    _can_terminate(self, op)
    return True


_can_terminate = HiRadixCache.can_terminate_prefetch

#: plant name -> the patches that plant it
PLANTS: dict[str, list[tuple[Any, str, Any]]] = {
    # hit counts reduced with MAX instead of MIN on every rank
    "hits_max": [(SyncGroup, "reduce", _flip("prefetch_hits", "min", "max"))],
    # [1 - can, terminated] reduced with MIN instead of MAX on every rank
    "terminate_min": [(SyncGroup, "reduce", _flip("control", "max", "min", width=2))],
    # writing_check pops one ack fewer than agreed
    "acks_one_short": [(HiRadixCache, "writing_check", _writing_check_one_short)],
    # the revoke threshold is applied to the wrong number (28 tokens, not the configured one)
    "threshold": [(rank_run, "cache_config", _config(prefetch_threshold=28))],
    # a prefetch inserts one page fewer than agreed
    "insert_short": [(HiRadixCache, "_release_prefetch", _release_one_page_short)],
    # wait_complete read as best_effort: stops with IO outstanding on every rank
    "wait_complete_early": [(rank_run, "cache_config",
                             _config(prefetch_stop_policy="best_effort"))],
    # the deadline read as 0 s: timeout stops before any deadline passed
    "timeout_early": [(rank_run, "cache_config", _config(prefetch_timeout_s=-1.0))],
    # the agreement says wait, the scheduler stops anyway
    "terminate_ignored": [(HiRadixCache, "can_terminate_prefetch", _terminate_always)],
    # best_effort read as wait_complete: waits for IO
    "best_effort_waits": [(rank_run, "cache_config",
                           _config(prefetch_stop_policy="wait_complete"))],
}


@contextmanager
def planted(name: str) -> Iterator[None]:
    with ExitStack() as stack:
        for obj, attr, value in PLANTS[name]:
            stack.enter_context(mock.patch.object(obj, attr, value))
        yield


def run_planted(ctx: Any, payload: dict) -> Any:
    """Torchrun job: run_schedule with a plant active in this worker, then undone."""
    from scenarios.sut.reference_jobs import run_schedule

    with planted(payload["plant"]):
        return run_schedule(ctx, payload)


def _release_per_call(self: HiCacheController, host_indices: Any) -> None:
    if host_indices.numel():
        self.host_mem_release_queue.put(host_indices)


_page_hashes = cache_controller_module.page_hashes
_drain = HiRadixCache.drain_storage_control_queues


def _hashes_off_by_one(token_ids: Any, page_size: int, prior: Any = None) -> list[str]:
    """Every page hash with its last hex digit changed: keys that are not SGLang's, used alike
    for writes and lookups (the reference stays self-consistent)."""
    return [h[:-1] + ("0" if h[-1] != "0" else "1")
            for h in _page_hashes(token_ids, page_size, prior)]


def _evict_most_recent_first(self: RadixTree, num_tokens: int, free_device: Any) -> int:
    """RadixTree.evict_device with the victim chosen MRU first instead of LRU first."""
    evicted = 0
    while evicted < num_tokens:
        cands = [n for n in self.nodes()
                 if not n.evicted and n.lock_ref == 0
                 and all(c.evicted for c in n.children.values())
                 and (n.backuped or n.host_ref_counter == 0)]
        if not cands:
            break
        victim = max(cands, key=lambda n: (n.last_access, n.id))  # the bug: max, not min
        free_device(victim.value)
        evicted += victim.value.numel()
        victim.value = None
        if not victim.backuped and not victim.children:
            self._delete(victim)
    return evicted


def _backup_acks_one_drain_late(self: HiRadixCache) -> None:
    """The drain counts only the backup acks already queued at the previous drain."""
    q = self.cache_controller.ack_backup_queue
    ready = getattr(self, "_plant_backup_ready", 0)
    qsize = q.qsize
    q.qsize = lambda: min(qsize(), ready)  # type: ignore[method-assign]
    try:
        _drain(self)
    finally:
        del q.qsize
    self._plant_backup_ready = q.qsize()


def _evict_host_keeps_slots(self: HiRadixCache, num_tokens: int) -> int:
    """evict_host that drops the host copies but never frees their slots (a leak)."""
    return self.tree.evict_host(num_tokens, lambda indices: None)


#: differential plants (no oracle rule is meant to see them: both SUTs stay self-consistent);
#: one per quantity differential mode compares, named by the `diff-*` invariant it must fire
DIFFERENTIAL_PLANTS: dict[str, list[tuple[Any, str, Any]]] = {
    # host pages queued one item per call, as the reference did, instead of one per page
    "host_release_per_call": [(HiCacheController, "append_host_mem_release", _release_per_call)],
    # keys: every page hash one digit off
    "keys": [(cache_controller_module, "page_hashes", _hashes_off_by_one)],
    # eviction order: most recently used first
    "eviction_order": [(RadixTree, "evict_device", _evict_most_recent_first)],
    # decisions: writing_check pops one ack fewer than agreed
    "decisions": [(HiRadixCache, "writing_check", _writing_check_one_short)],
    # host-page releases: one item per call instead of one per page
    "releases": [(HiCacheController, "append_host_mem_release", _release_per_call)],
    # backup-ack timing: acked one drain late
    "backup_timing": [(HiRadixCache, "drain_storage_control_queues",
                       _backup_acks_one_drain_late)],
    # slot accounting: host slots of evicted host copies never freed
    "slots": [(HiRadixCache, "evict_host", _evict_host_keeps_slots)],
}

#: the invariants a differential plant may fire first: its own quantity, or one it moves
#: (the shrunk Schedule is the smallest that shows any difference): another eviction order
#: writes other nodes back (keys); one write ack short acks their storage backups later
DIFFERENTIAL_PLANT_FINDS = {"keys": ("diff-keys",),
                            "eviction_order": ("diff-evictions", "diff-keys"),
                            "decisions": ("diff-decisions", "diff-backup-acks"),
                            "releases": ("diff-host-releases",),
                            "backup_timing": ("diff-backup-acks",), "slots": ("diff-slots",)}


@contextmanager
def planted_differential(name: str) -> Iterator[None]:
    with ExitStack() as stack:
        for obj, attr, value in DIFFERENTIAL_PLANTS[name]:
            stack.enter_context(mock.patch.object(obj, attr, value))
        yield
