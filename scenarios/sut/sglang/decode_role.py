"""The decode side of PD disaggregation with HiCache (a Schedule's `decode_add` op).

A decode server receives a request whose KV a prefill server computes; the prefix the decode
side already holds is restored locally through HiCache instead of being transferred. SGLang
0.5.13+ does this in `srt/disaggregation/decode_hicache_mixin.py`; its methods are called here,
unchanged, on a stand-in for the prealloc and transfer queues, in the order SGLang's decode
event loop calls them (`process_decode_queue`):

1. `check_hicache_events()` (the driver's step does it first, as on any server);
2. prealloc: match and lock the prefix (to 0.5.20 `match_prefix_for_req` and a lock receipt;
   0.5.23+ `match_kv_cache` and a lock handle, `tree_cache.lock`/`unlock`),
   `_build_decode_prefix_match` (the storage hit query: `query_storage_hit_length`, a MIN over
   the attention groups), `_start_hicache_prefetch`;
3. transfer: `_process_hicache_local_restores` (the load-back event checks,
   `is_load_back_event_done`: to 0.5.20 it runs `loading_check` when this rank's event is done,
   0.5.23 only queries the event; the L3 prefetch's `check_prefetch_progress`;
   `init_load_back`; `ready_to_load_host_cache`);
4. the KV poll: each request's poll gated on its restore (`HiCacheRestoreGatedKVReceiver`),
   MIN-reduced over the attention TP then CP groups as `poll_and_all_reduce*` does; the
   prefill's KV is taken to have arrived at once (only the HiCache restore is modelled).
   A request whose agreed poll is Success and whose restore is READY runs (the driver's
   `_run`: match, fill, verify every page, insert); one whose restore FAILED, or whose agreed
   poll is Failed (0.5.23+: a FAILED restore polls Failed), is aborted. The restore status is
   rank-local (each rank's own copy event): `decode_poll` logs it as a local value and what
   the rank does with the agreed poll (wait, commit, abort) as its outcome.

The Schedule decides how far the load-back copies got before step 3 (a choice point,
"load_back_event"), through the same GatedDevice events as `loading_check`.
"""

from __future__ import annotations

from types import MethodType, SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from scenarios.core.errors import MissingSeam
from scenarios.sut.sglang import adapters

MIXIN = "sglang.srt.disaggregation.decode_hicache_mixin"


class _Received:
    """A kv_receiver whose transfer from the prefill server has completed."""

    def __init__(self, success: Any) -> None:
        self.success = success

    def poll(self) -> Any:
        return self.success


def _match_kv_cache(mixin: Any, cache: Any) -> Any:
    """0.5.23+: the prealloc matches with `mem_cache.common.match_kv_cache` and holds the
    prefix through a lock handle (`tree_cache.lock` -> TreeLock, `unlock(handle)`); the
    restore's lock is `hicache_restore_lock`. None where the mixin predates it."""
    if hasattr(mixin, "match_prefix_for_req") or not hasattr(cache, "unlock"):
        return None
    import importlib

    common = importlib.import_module("sglang.srt.mem_cache.common")
    return getattr(common, "match_kv_cache", None)


def _load_mixin(version: str) -> Any:
    import importlib

    try:
        return importlib.import_module(MIXIN)
    except ModuleNotFoundError as e:
        if e.name != MIXIN:
            raise
        raise MissingSeam(f"sglang {version} has no decode_hicache_mixin (the decode side of PD "
                          "disaggregation with HiCache; from 0.5.13)") from None


class DecodeRole:
    """One rank's decode-side queues; `driver` provides the cache, pacer and _decide."""

    def __init__(self, driver: Any) -> None:
        self.d = driver
        self.cache = driver.cache
        self.m = m = _load_mixin(driver.st["version"])
        self.match_kv_cache = _match_kv_cache(m, self.cache)
        if self.match_kv_cache is None and not hasattr(m, "match_prefix_for_req"):
            raise MissingSeam(f"sglang {driver.st['version']}'s decode_hicache_mixin matches "
                              "neither through match_prefix_for_req nor through match_kv_cache "
                              "and the tree cache's lock handles")
        from sglang.srt.disaggregation.base import KVPoll

        self.KVPoll = KVPoll
        q = SimpleNamespace(tree_cache=self.cache,
                            scheduler=SimpleNamespace(enable_decode_hicache=True),
                            transfer_queue=SimpleNamespace(queue=[]))
        for cls in (m.DecodeHiCachePreallocMixin, m.DecodeHiCacheTransferMixin):
            for name, fn in vars(cls).items():
                if callable(fn) and not name.startswith("__"):
                    setattr(q, name, MethodType(fn, q))
        self.q = q
        self.pending: list[Any] = []  # added, not yet preallocated
        self.tokens: dict[str, list[int]] = {}

    # -- ops -----------------------------------------------------------------------------------
    def add(self, rid: str, tokens: list[int]) -> None:
        ps = self.d.ps
        aligned = tokens[:len(tokens) // ps * ps]
        self.tokens[rid] = aligned
        self.pending.append(self._req(rid, aligned))

    def abort(self, rid: str) -> bool:
        for i, req in enumerate(self.pending):
            if req.rid == rid:
                self.pending.pop(i)
                return True
        for dr in list(self.q.transfer_queue.queue):
            if dr.req.rid == rid:
                self.d._current_rid = rid
                self.q._clean_hicache_prefetch_resources(dr)
                self._release_prefix_lock(dr)
                self.q.transfer_queue.queue.remove(dr)
                return True
        return False

    def busy(self) -> bool:
        return bool(self.pending or self.q.transfer_queue.queue)

    # -- one scheduler step ------------------------------------------------------------------
    def step(self) -> None:
        for req in self.pending:
            self._prealloc(req)
        self.pending = []
        queue = self.q.transfer_queue.queue
        if not queue:
            return
        self.d.pacer.events("load_back_event", "load")
        self.q._process_hicache_local_restores(list(queue))
        polls = [int(self.m.HiCacheRestoreGatedKVReceiver(dr).poll()) for dr in queue]
        agreed = self._poll_min(polls)
        failed = self.m.HiCacheRestoreResult.FAILED
        pending = self.m.HiCacheRestoreResult.PENDING
        codes = list(self.m.HiCacheRestoreResult)
        for dr, local, got in zip(list(queue), polls, agreed, strict=True):
            status = dr.hicache_restore_status
            # SGLang: `poll == Failed or restore FAILED` aborts (0.5.23+: the gated poll
            # reports a FAILED restore as Failed, so the MIN makes every rank abort it)
            if status == failed or got == int(self.KVPoll.Failed):
                action = "abort"
            elif got == int(self.KVPoll.Success) and status != pending:
                action = "commit"
            else:
                action = "wait"
            # the restore status is rank-local (each rank's own load-back event), so it is a
            # local value; the outcome is what this rank does with the agreed poll
            self.d._decide("decode_poll", dr.req.rid, (local, codes.index(status)), (got,),
                           f"poll {self._poll_name(got)}: {action}")
            if action == "abort":
                self.q._clean_hicache_prefetch_resources(dr)
                self._release_prefix_lock(dr)
                queue.remove(dr)
                self.d.outcomes.append({"rid": dr.req.rid, "status": "restore_failed",
                                        "device_hit": 0, "host_hit": 0, "computed": 0,
                                        "bad_pages": []})
            elif action == "commit":
                queue.remove(dr)
                self._commit(dr)

    def _prealloc(self, req: Any) -> None:
        """`DecodePreallocQueue._match_prefix_and_lock` then `_start_hicache_prefetch`."""
        cache = self.cache
        self.d._current_rid = req.rid
        result = self._match(req)
        if self.match_kv_cache is not None:
            req.lock = cache.lock(result.last_device_node)
        else:
            req.lock_receipt = adapters.lock(cache, result.last_device_node)
        pm = self.q._build_decode_prefix_match(req, result)
        self.d._decide("decode_prefix", req.rid, (), (pm.l1_prefix_len, pm.l2_host_hit_length,
                                                     pm.l3_storage_hit_length),
                       f"device {pm.l1_prefix_len}, host {pm.l2_host_hit_length}, storage "
                       f"{pm.l3_storage_hit_length} tokens")
        dr = SimpleNamespace(req=req, kv_receiver=_Received(self.KVPoll.Success),
                             prefix_match=pm, hicache_restored_kv_indices=None,
                             hicache_restored_node=None, hicache_restore_lock_receipt=None,
                             hicache_restore_lock=None,
                             hicache_load_consumer_index=-1,
                             hicache_restore_status=self.m.HiCacheRestoreResult.PENDING)
        self.q._start_hicache_prefetch(req, pm)
        if pm.prefetch_registered:  # its hit query all-reduces in the prefetch thread
            self.d.gates.settle("query")
        self.q.transfer_queue.queue.append(dr)

    def _match(self, req: Any) -> Any:
        """The release's prealloc match on the request: `match_kv_cache` (0.5.23+, no SWA
        tail: no max_prefix_len; no Mamba: cow_mamba False) or `match_prefix_for_req`."""
        if self.match_kv_cache is not None:
            return self.match_kv_cache(req, self.cache, req.origin_input_ids, cow_mamba=False)
        return adapters.call_filtered(self.m.match_prefix_for_req, tree_cache=self.cache, req=req,
                                      token_ids=req.origin_input_ids, cow_mamba=False,
                                      include_req=True)

    def _commit(self, dr: Any) -> None:
        """The restore is agreed done: drop the prealloc and restore locks (SGLang hands the
        restored lock to the request) and run the request as the driver runs any: the restored
        prefix must now match on device, with the KV the prefill side computed."""
        cache = self.cache
        if self.match_kv_cache is not None:  # SGLang hands this lock to the request
            cache.unlock(dr.hicache_restore_lock)
            dr.hicache_restore_lock = None
        if dr.hicache_restored_node is not None:
            adapters.unlock(cache, dr.hicache_restored_node,
                            getattr(dr, "hicache_restore_lock_receipt", None))
            dr.hicache_restored_node = None
        self._release_prefix_lock(dr)
        self.d._current_rid = dr.req.rid
        self.d._run(dr.req.rid, self.tokens[dr.req.rid])

    def _release_prefix_lock(self, dr: Any) -> None:
        pm = dr.prefix_match
        if self.match_kv_cache is not None:
            self.cache.unlock(dr.req.lock)
            dr.req.lock = None
            return
        if pm is not None and getattr(dr.req, "lock_receipt", "") != "":
            adapters.unlock(self.cache, pm.last_device_node, dr.req.lock_receipt)
            dr.req.lock_receipt = ""

    def _poll_name(self, value: int) -> str:
        """KVPoll is a plain class of int constants in these releases."""
        return next((k for k, v in vars(self.KVPoll).items()
                     if not k.startswith("_") and isinstance(v, int) and v == value), str(value))

    def _poll_min(self, polls: list[int]) -> list[int]:
        """`poll_and_all_reduce_attn_cp_tp_group`: MIN over attention TP, then CP."""
        t = torch.tensor(polls, dtype=torch.uint8)
        for name in ("attn_tp", "attn_cp"):
            coord = self.d.st[name]
            if coord.world_size > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=coord.cpu_group)
        return [int(x) for x in t.tolist()]

    # -- the request a decode server holds -------------------------------------------------------
    def _req(self, rid: str, tokens: list[int]) -> Any:
        handle = adapters._rid_arg(self.cache.check_prefetch_progress, rid)
        return adapters.RequestStandIn(
            rid=rid, origin_input_ids=adapters.token_seq(tokens), output_ids=[], prefix_len=0,
            lock=None,
            extra_key=None, cache_salt=None, cache_request_handle=handle, last_node=None,
            last_host_node=None, best_match_node=None, prefix_indices=None, host_hit_length=0,
            swa_host_hit_length=0, mamba_host_hit_length=0, lock_receipt="",
            swa_prefix_lock_released=False, swa_branching_seqlen=None,
            mamba_branching_seqlen=None, num_matched_prefix_tokens=0, session=None,
            to_finish=None, finished_reason=None, session_id=None,
            kv=adapters.RequestStandIn(mamba_pool_idx=None, req_pool_idx=None,
                                       cache_protected_len=None),
            _compute_max_prefix_len=lambda n: n)
