"""Drive one rank's SGLang HiRadixCache the way SGLang's scheduler does, and observe it.

Per scheduler step: `check_hicache_events()` (writing_check, loading_check, drain of the
storage control queues), then for each waiting request with a prefetch `check_prefetch_progress`
(which runs `can_terminate_prefetch`; a request that cannot terminate yet is skipped, as the
scheduler does), then the ready requests run: match, load back host hits, "forward" (fill the
uncached pages with KV that is a pure function of the page's tokens and the rank's head shard),
insert. Abort of a prefetching request: `release_aborted_request`.

Each decision point is wrapped, not changed: the Schedule's choice for it is applied first
(seams.SglangPacer), its local input and agreed result are logged as a decision, and the tree
digest is taken after it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
from collections import OrderedDict, defaultdict
from typing import Any

import torch

from scenarios.sut.sglang import adapters, pools, server_cache, tree_view
from scenarios.sut.sglang.hitqueue import HitQueuePipeline, io_busy, uses_hit_queue
from scenarios.sut.sglang.mooncake import storage_args
from scenarios.sut.sglang.seams import count_puts, leading_done, record_terminated


def returns_early_when_idle(cache: Any) -> bool:
    """Whether this release's `writing_check` returns before its agreement when nothing is in
    flight (to 0.5.13: "all ranks has the same ongoing_write_through, can skip sync if empty");
    read from the release's own source, so the driver logs a decision exactly where the release
    makes one."""
    src = inspect.getsource(type(cache).writing_check)
    head = src.split("finish_count", 1)[0]
    return re.search(r"if len\(self\.ongoing_write_through\) == 0:\s*return\b", head) is not None


class Driver:
    def __init__(self, s: Any, st: dict, run: Any, dev: Any, dp_attention: bool) -> None:
        self.s = s
        self.st = st
        self.run = run
        self.dev = dev
        self.pacer = run.pacer
        self.gates = run.gates
        self.decisions: dict[str, list[list]] = defaultdict(list)
        self.digests: list[str] = []
        #: when each scheduler decision was made (time.monotonic()): SGLang's own checker's
        #: delay is measured from the first divergent one (consensus.py)
        self.decided_at: list[float] = []
        self.outcomes: list[dict] = []
        self.waiting: OrderedDict[str, list[int]] = OrderedDict()
        self.ready: OrderedDict[str, list[int]] = OrderedDict()
        self.cache = None
        self.view: Any = None  # tree_view: what the checker sees of the tree
        self.cache_class = ""
        self.pipeline: HitQueuePipeline | None = None
        #: 0.5.20 re-issues a storage lookup when the match shrank before admission
        self.reissue_max = 0
        self.last_match: dict[str, int] = {}
        self.reissues: dict[str, int] = {}
        #: the decode side of PD disaggregation, made at the first `decode_add` (decode_role.py)
        self.decode: Any = None
        self.ps = s.cache.page_size
        self._build(dp_attention)

    # -- construction --------------------------------------------------------------------
    def _build(self, dp_attention: bool) -> None:
        import sglang.srt.layers.dp_attention as dpa

        cc_mod = self.st["cc_mod"]
        cc_mod.device_module = self.dev  # before construction: the layer counter makes events
        try:  # 0.5.20 records the L1<->L2 copy events in its own transfer engine
            import sglang.srt.mem_cache.l2_transfer as l2

            l2.device_module = self.dev
        except ImportError:
            pass
        dpa._ENABLE_DP_ATTENTION_FLAG = bool(dp_attention)
        if getattr(dpa, "_ATTN_DP_RANK", None) is None:
            dpa._ATTN_DP_RANK = 0
        c = self.s.cache
        ps = self.ps
        device_tokens = c.device_pages * ps
        host_tokens = max(c.host_pages, c.device_pages + 1) * ps
        from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

        kv = pools.build_device_pool(c.mla, device_tokens, ps)  # the host pool follows its class
        alloc = adapters.call_filtered(PagedTokenToKVPoolAllocator, size=device_tokens,
                                       page_size=ps, dtype=torch.float32, device="cpu",
                                       kvcache=kv, need_sort=False)
        req_pool = adapters.call_filtered(ReqToTokenPool, size=64, max_context_len=4096,
                                          device="cpu", enable_memory_saver=False)
        self.kv, self.alloc = kv, alloc
        tp_group = (self.st["attn_tp"] if dp_attention else self.st["tp"]).cpu_group
        extra = {"prefetch_threshold": c.prefetch_threshold,
                 "prefetch_timeout_base": 1e9, "prefetch_timeout_per_ki_token": 0}
        lay = self.s.layout_obj
        store = storage_args(self.s.backend, self.run, extra,
                             lay.tp if dp_attention else lay.tp * lay.cp)
        server_args = adapters.server_args(
            self.st["model_dir"], page_size=ps, hicache_ratio=host_tokens / device_tokens,
            hicache_size=0, hicache_mem_layout=store["hicache_mem_layout"],
            hicache_io_backend="direct",
            hicache_storage_backend=store["hicache_storage_backend"],
            hicache_storage_backend_extra_config=json.dumps(store["extra"]),
            hicache_storage_prefetch_policy=c.prefetch_stop_policy,
            hicache_write_policy=c.write_policy, dp_attention=dp_attention,
            tp=lay.tp * lay.cp, cp=lay.cp, pp_size=lay.pp, rank=self.run.rank)
        adapters.set_dp_attention(dp_attention)  # after publishing the server args
        pp = self.st["pp"]
        params = adapters.cache_init_params(
            req_to_token_pool=req_pool, token_to_kv_pool_allocator=alloc, page_size=ps,
            disable=False, tp_cache_group=tp_group,
            attn_cp_cache_group=self.st["attn_cp"].cpu_group,
            attn_tp_cache_group=self.st["attn_tp"].cpu_group,
            attn_cp_rank=self.st["attn_cp"].rank_in_group,
            attn_cp_size=self.st["attn_cp"].world_size, pp_rank=pp.rank_in_group,
            pp_size=pp.world_size, pp_cache_group=pp.cpu_group)
        os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = self.run.storage_dir
        tp_cpu = self.st["tp"]
        self.cache = cache = server_cache.build(
            params, server_args, tp_group=tp_cpu.cpu_group, tp_rank=tp_cpu.rank_in_group,
            tp_size=tp_cpu.world_size, cache_class=self.run.cache_class)
        self.cache_class = type(cache).__name__
        try:
            server_cache.check_seams(
                cache, self.st["version"],
                hit_queue=uses_hit_queue(getattr(cache, "cache_controller", None)),
                timeout_policy=c.prefetch_stop_policy == "timeout")
        except server_cache.MissingSeam:
            self.shutdown()
            self.cache = None
            raise
        self.view = tree_view.for_cache(cache)
        if _scheduler_has("_prefetch_after_device_hit_loss"):
            self.reissue_max = adapters.storage_prefetch_retry_max_attempts(server_args)
        cc = cache.cache_controller
        self.cc = cc
        engine = getattr(cc, "l2_transfer_engine", None)
        if engine is not None:  # 0.5.20
            self.dev.name_streams(engine.device_to_host_stream, engine.host_to_device_stream)
        else:
            self.dev.name_streams(cc.write_stream, cc.load_stream)
        self._hook(cache, cc)
        if any(call == "prefetch_alloc" for fs in self.s.faults.values() for call, _ in fs):
            from scenarios.sut.sglang import prefetch_alloc_fault

            prefetch_alloc_fault.install(self.pacer, cache, cc)

    def _hook(self, cache: Any, cc: Any) -> None:
        """Wrap the decision points and count operations in and out of each IO thread."""
        gates = self.gates
        # wait for the prefetch thread to have made its IO buffer (it makes it at start)
        for _ in range(2000):
            if hasattr(cc, "prefetch_buffer"):
                break
            import time

            time.sleep(0.005)
        self._insert_hooks(cache, cc)
        if uses_hit_queue(cc):  # 0.5.16 .. 0.5.20
            self.pipeline = HitQueuePipeline(self, cache, cc)
            self.pipeline.install()
            return
        count_puts(cc.prefetch_queue, lambda _op: gates.op_in("query"))
        count_puts(cc.prefetch_buffer, lambda _op: (gates.op_out("query"), gates.op_in("get")))
        count_puts(cc.backup_queue, lambda _op: gates.op_in("set"))
        count_puts(cc.ack_backup_queue, lambda _op: gates.op_out("set"))
        self._revoked_in_query = False

        def on_revoke(_rid: Any) -> None:
            self._revoked_in_query = True
        count_puts(cc.prefetch_revoke_queue, on_revoke)
        orig_release = cc.append_host_mem_release

        def append_host_mem_release(host_indices: torch.Tensor) -> None:
            orig_release(host_indices)
            name = __import__("threading").current_thread().name
            if "prefetch_io_aux" in name:
                gates.op_out("get")
            elif "prefetch_thread" in name and self._revoked_in_query:
                self._revoked_in_query = False
                gates.op_out("query")
        cc.append_host_mem_release = append_host_mem_release

        # decision points
        orig_writing = cache.writing_check
        orig_loading = cache.loading_check
        orig_drain_impl = getattr(cache, "_drain_storage_control_queues_impl", None)
        orig_can = cache.can_terminate_prefetch

        idle_return = returns_early_when_idle(cache)

        def writing_check(write_back: bool = False) -> Any:
            if write_back:  # blocks until every write finished: no collective, as the reference
                before = len(cc.ack_write_queue)
                out = orig_writing(write_back=True)
                n = before - len(cc.ack_write_queue)
                self._decide("writing_check", "", (n,), (n,), f"ack {n} writes (write-back)")
                return out
            self.pacer.events("writing_check", "write")
            if idle_return and not cache.ongoing_write_through:
                return orig_writing()  # no collective, no decision: the reference logs none
            local = sum(1 for _ in leading_done(cc.ack_write_queue))
            before = len(cc.ack_write_queue)
            out = orig_writing()
            agreed = before - len(cc.ack_write_queue)
            self._decide("writing_check", "", (local,), (agreed,), f"ack {agreed} writes")
            return out

        def loading_check() -> Any:
            self.pacer.events("loading_check", "load")
            local = sum(1 for _ in leading_done(cc.ack_load_queue))
            before = len(cc.ack_load_queue)
            out = orig_loading()
            agreed = before - len(cc.ack_load_queue)
            self._decide("loading_check", "", (local,), (agreed,), f"ack {agreed} loads")
            return out

        cache.writing_check = writing_check
        cache.loading_check = loading_check
        if orig_drain_impl is not None:
            orig_drain = cache.drain_storage_control_queues

            def drain() -> Any:
                self.pacer.io("drain", "set")
                if self.pacer.drain:  # the end of the run: every IO thread finishes its work
                    self.pacer.io("drain", "get")
                self.gates.settle("get")
                self._local_q = (cc.prefetch_revoke_queue.qsize(), cc.ack_backup_queue.qsize(),
                                 cc.host_mem_release_queue.qsize())
                return orig_drain()

            def drain_impl(n_revoke: int, n_backup: int, n_release: int, **kw: Any) -> Any:
                out = orig_drain_impl(n_revoke=n_revoke, n_backup=n_backup,
                                      n_release=n_release, **kw)
                if (n_revoke, n_backup, n_release) == (None, None, None):
                    return out  # the detach's local drain: no collective, no decision
                self._decide("drain", "", getattr(self, "_local_q", ()),
                             (n_revoke, n_backup, n_release),
                             f"revoke {n_revoke}, backup acks {n_backup}, release {n_release}")
                return out
            cache.drain_storage_control_queues = drain
            cache._drain_storage_control_queues_impl = drain_impl

        def can_terminate_prefetch(operation: Any) -> bool:
            self.pacer.io("prefetch_progress", "get")
            out = orig_can(operation)
            # SGLang reduces [1 - can, terminated] inside; its local `can` is not exposed
            self._decide("can_terminate", operation.request_id,
                         (None, int(operation.is_terminated())),
                         (int(bool(out)),), "terminate" if out else "wait")
            return out
        cache.can_terminate_prefetch = can_terminate_prefetch

        record_terminated(cc, self)

    def _insert_hooks(self, cache: Any, cc: Any) -> None:
        """Hooks every release shares: the prefetch insert, and the timeout on pacer ticks."""
        # where a finished prefetch's pages enter the tree (UnifiedRadixCache: its tree core)
        owner, name = ((cache.tree_core, "insert_host") if adapters.is_unified(cache)
                       else (cache, "_insert_helper_host"))
        orig_insert_host = getattr(owner, name)

        def insert_helper_host(node: Any, key: Any, host_value: Any, hash_value: Any) -> Any:
            agreed = len(key)
            out = orig_insert_host(node, key, host_value, hash_value)
            self._decide("prefetch_done", self._current_rid,
                         (getattr(self, "_last_completed", -1),), (agreed,),
                         f"insert {agreed} tokens")
            return out
        setattr(owner, name, insert_helper_host)
        self._host_alloc_faults(cache, cc)

        if self.s.cache.prefetch_stop_policy == "timeout":
            start: dict[int, int] = {}
            orig_prefetch = cc.prefetch

            def prefetch(*a: Any, **k: Any) -> Any:
                op = orig_prefetch(*a, **k)
                start[id(op)] = self.pacer.now()
                return op
            cc.prefetch = prefetch
            ticks = self.s.cache.prefetch_timeout_ticks
            name = server_cache.alias(cache, "is_prefetch_timeout")
            ours = lambda op: self.pacer.now() - start.get(id(op), 0) > ticks  # noqa: E731
            if name == "_prefetch_deadline_expired":
                # 0.5.21+: the release's own verdict stays (an expiry its ranks agreed on
                # sticks); its wall-clock deadline is far away (prefetch_timeout_base), ours
                # counts pacer ticks from the prefetch's start
                orig_expired = getattr(cache, name)
                setattr(cache, name, lambda op: bool(orig_expired(op)) or ours(op))
            else:
                setattr(cache, name, ours)

    def _host_alloc_faults(self, cache: Any, cc: Any) -> None:
        """A Schedule's "host_alloc" fault: this rank's n-th `write_backup` finds no host
        memory, in both of SGLang's attempts (before and after `evict_host`), as a host pool
        under pressure on this rank only; the reference counts the same calls."""
        # one node's backup to host (UnifiedRadixCache: `_execute_kv_backup`, which evicts
        # host memory and writes once)
        backup_name = server_cache.alias(cache, "write_backup")
        orig_backup, orig_write = getattr(cache, backup_name), cc.write
        calls, refusing = [0], [False]

        def write_backup(*a: Any, **k: Any) -> Any:
            refusing[0] = self.pacer.fail("host_alloc", calls[0])
            calls[0] += 1
            try:
                return orig_backup(*a, **k)
            finally:
                refusing[0] = False

        def write(*a: Any, **k: Any) -> Any:
            return None if refusing[0] else orig_write(*a, **k)
        setattr(cache, backup_name, write_backup)
        cc.write = write

    # -- observation -----------------------------------------------------------------------
    def _decide(self, kind: str, rid: str, local: tuple, agreed: tuple, outcome: str) -> None:
        self.decisions["scheduler"].append([kind, rid, list(local), list(agreed), outcome])
        self.digests.append(self.digest())
        self.decided_at.append(time.monotonic())

    def digest(self) -> str:
        return self.view.digest()

    def residency(self) -> tuple[str, ...] | None:
        """The pages on device and host, as the reference reports them (differential mode);
        () where the tree cannot be walked (0.5.21+'s Rust tree core: its KV cache events name
        pages by hash, not by tokens): None, eviction order is not observable there."""
        from scenarios.client.residency import page_residency

        if not tree_view.walkable(self.cache):
            return None
        rows, stack = [], [(self.cache.root_node, ())]
        while stack:
            n, prefix = stack.pop()
            for child in n.children.values():
                key = tuple(adapters.token_ids(child.key))
                rows.append((prefix + key, len(key), adapters.on_device(child),
                             adapters.on_host(child)))
                stack.append((child, prefix + key))
        return page_residency(rows, self.ps)

    # -- ops -------------------------------------------------------------------------------
    def apply(self, op: Any) -> None:
        if op.kind == "add":
            self.add(op.rid, op.tokens, op.prefetch)
        elif op.kind == "step":
            self.step()
        elif op.kind == "abort":
            self.abort(op.rid)
        elif op.kind == "evict_device":
            adapters.evict(self.cache, op.n)
        elif op.kind == "evict_host":
            self.cache.evict_host(op.n)
        elif op.kind == "decode_add":
            if self.decode is None:
                from scenarios.sut.sglang.decode_role import DecodeRole

                self.decode = DecodeRole(self)
            self.decode.add(op.rid, op.tokens)

    def add(self, rid: str, tokens: list[int], prefetch: bool) -> None:
        if rid in self.waiting or rid in self.ready:
            raise ValueError(f"duplicate request id {rid}")
        cache = self.cache
        if prefetch and cache.enable_storage:
            self.reissues[rid] = 0
            if self._prefetch(rid, tokens):
                self.waiting[rid] = list(tokens)
                return
        self.ready[rid] = list(tokens)

    def _prefetch(self, rid: str, tokens: list[int]) -> bool:
        """The scheduler's `_prefetch_kvcache`: match, then prefetch what follows the match."""
        cache = self.cache
        m = adapters.match(cache, tokens)
        hit = adapters.device_prefix_len(m) + m.host_hit_length
        self.last_match[rid] = hit
        last = m.last_host_node
        last_hash = adapters.last_hash(last, cache)
        self._current_rid = rid
        adapters.prefetch_from_storage(cache, rid, last, tokens[hit:], last_hash)
        if adapters.prefetching(cache, rid):
            # every rank waits here for its hit query (it all-reduces), as the reference does
            self.gates.settle("query")
            return True
        return False

    def _hit_lost(self, rid: str, tokens: list[int]) -> bool:
        """0.5.20's `_prefetch_after_device_hit_loss`: at admission, a request whose device +
        host match shrank since its storage lookup (queue-time eviction) looks up storage
        again, up to `hicache_storage_prefetch_retry_max_attempts` times, and waits."""
        if not self.reissue_max or not self.last_match.get(rid):
            return False
        m = adapters.match(self.cache, tokens)
        if adapters.device_prefix_len(m) + m.host_hit_length >= self.last_match[rid]:
            return False
        if self.reissues[rid] >= self.reissue_max:
            self.last_match[rid] = adapters.device_prefix_len(m) + m.host_hit_length
            return False
        self.reissues[rid] += 1
        self._prefetch(rid, tokens)
        return True

    def abort(self, rid: str) -> None:
        if self.decode is not None and self.decode.abort(rid):
            self.outcomes.append(_outcome(rid, "aborted"))
            return
        if rid in self.waiting:
            self.waiting.pop(rid)
            self._current_rid = rid
            adapters.release_aborted_request(self.cache, rid)
        elif rid in self.ready:
            self.ready.pop(rid)
        else:
            return
        self.outcomes.append(_outcome(rid, "aborted"))

    def step(self) -> None:
        cache = self.cache
        cache.check_hicache_events()
        if self.decode is not None:  # a decode server's queues (decode_role.py)
            self.decode.step()
        for rid in list(self.waiting):
            self._current_rid = rid
            if adapters.check_prefetch_progress(cache, rid):
                self.ready[rid] = self.waiting.pop(rid)
        while self.ready:
            rid, tokens = self.ready.popitem(last=False)
            if self._hit_lost(rid, tokens):
                self.waiting[rid] = tokens  # skipped this pass, as the scheduler does
                continue
            self._run(rid, tokens)

    def _run(self, rid: str, tokens: list[int]) -> None:
        cache, ps = self.cache, self.ps
        aligned = len(tokens) // ps * ps
        tokens = tokens[:aligned]
        m = adapters.match(cache, tokens)
        host_hit = m.host_hit_length
        loaded = 0
        if host_hit:
            adapters.init_load_back(cache, m, host_hit, rid)
            cache.ready_to_load_host_cache()
            m2 = adapters.match(cache, tokens)
            loaded = adapters.device_prefix_len(m2) - adapters.device_prefix_len(m)
            m = m2
        prefix = adapters.device_indices(cache, m)
        receipt = adapters.lock(cache, m.last_device_node)
        try:
            need = aligned - len(prefix)
            new = self.alloc.alloc(need) if need else torch.empty(0, dtype=torch.int64)
            if new is None:
                adapters.evict(cache, need)
                new = self.alloc.alloc(need)
            if new is None:
                self.outcomes.append(_outcome(rid, "rejected", len(prefix) - loaded, loaded))
                return
            indices = torch.cat([prefix.to(torch.int64), new.to(torch.int64)])
            self._fill(tokens, indices, len(prefix))
            bad = self._verify(tokens, indices)
            done = adapters.insert(cache, tokens, indices, len(prefix))
            # SGLang frees the slots of tokens another request cached meanwhile
            if done > len(prefix) and not adapters.frees_duplicates(cache):
                self.alloc.free(indices[len(prefix):done])
        finally:
            adapters.unlock(cache, m.last_device_node, receipt)
        self.outcomes.append(_outcome(rid, "done", len(prefix) - loaded, loaded, need, bad))

    # -- KV content: a pure function of the page's tokens and this rank's head shard ---------
    def _page_kv(self, tokens: list[int], page: int) -> torch.Tensor:
        ps = self.ps
        h = hashlib.blake2b(repr(tokens[:(page + 1) * ps]).encode(), digest_size=4).digest()
        shard = 0 if self.s.cache.mla else self.run.key_tp  # MLA's latent is replicated
        return pools.page_values(self.kv, ps, int.from_bytes(h, "little") % 9973 + 1000 * shard)

    def _fill(self, tokens: list[int], indices: torch.Tensor, start: int) -> None:
        ps = self.ps
        for page in range(start // ps, len(tokens) // ps):
            idx = indices[page * ps:(page + 1) * ps]
            pools.write_page(self.kv, idx, self._page_kv(tokens, page))

    def _verify(self, tokens: list[int], indices: torch.Tensor) -> list[int]:
        ps = self.ps
        bad = []
        for page in range(len(tokens) // ps):
            idx = indices[page * ps:(page + 1) * ps]
            if not pools.page_intact(self.kv, idx, self._page_kv(tokens, page)):
                bad.append(page)
        return bad

    # -- end of run ------------------------------------------------------------------------
    def busy(self) -> bool:
        cache, cc = self.cache, self.cc
        g = self.gates
        io = any(g.ops_in[k] != g.ops_out[k] for k in ("query", "get", "set"))
        if self.pipeline is not None:
            io = io or io_busy(self, cc)
        decode = self.decode is not None and self.decode.busy()
        return bool(io or decode or self.waiting or self.ready or cache.ongoing_write_through
                    or cache.ongoing_load_back or cache.ongoing_prefetch
                    or getattr(cache, "ongoing_backup", None)
                    or (hasattr(cc, "prefetch_revoke_queue") and cc.prefetch_revoke_queue.qsize())
                    or cc.ack_backup_queue.qsize()
                    or cc.host_mem_release_queue.qsize() or cc.ack_write_queue
                    or cc.ack_load_queue)

    def snapshot(self) -> dict:
        cache = self.cache
        dev_tokens, host_tokens = self.view.tokens()
        host = cache.cache_controller.mem_pool_host
        return {
            "tree_digest": self.digest(),
            "device_used": self.alloc.size - self.alloc.available_size(),
            "host_used": host.size - host.available_size(),
            "tree_device_tokens": dev_tokens,
            "tree_host_tokens": host_tokens,
            "in_flight": {"write_through": len(cache.ongoing_write_through),
                          "load_back": len(cache.ongoing_load_back),
                          "prefetch": len(cache.ongoing_prefetch),
                          "backup": len(getattr(cache, "ongoing_backup", {}))},
            "busy": self.busy(),
            "device": "cpu", "host_pinned": False, "cuda_event_acks": False,
            "cache_class": self.cache_class,
        }

    def shutdown(self) -> None:
        if self.cache is None:
            return
        try:
            self.cache.shutdown()
        except Exception:
            pass
        import atexit

        atexit.unregister(self.cache.shutdown)  # a long-lived worker must not keep every cache


def _scheduler_has(name: str) -> bool:
    """Whether this release's scheduler defines `name` (read, not imported: the scheduler
    module pulls in the whole server)."""
    import sglang

    path = os.path.join(os.path.dirname(sglang.__file__), "srt", "managers", "scheduler.py")
    try:
        with open(path) as f:
            return f"def {name}(" in f.read()
    except OSError:
        return False


def _outcome(rid: str, status: str, device_hit: int = 0, host_hit: int = 0, computed: int = 0,
             bad: list[int] | None = None) -> dict:
    return {"rid": rid, "status": status, "device_hit": device_hit, "host_hit": host_hit,
            "computed": computed, "bad_pages": bad or []}


_ = inspect  # signatures are read in adapters
