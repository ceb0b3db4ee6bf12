"""The seams for SGLang's hit-queue prefetch pipeline (0.5.16 .. 0.5.20).

From 0.5.16 the prefetch thread no longer allocates host memory: after its hit query (MIN over
the prefetch sync groups) it puts the operation on `prefetch_hit_queue`, and the scheduler
allocates host pages for it inside the drain (`_drain_and_alloc_storage_hit`) and only then
hands it to the IO thread (`prefetch_buffer`). Per release (read from the wheels):

| release  | revoke below threshold | agreement per scheduler step          | prefetch progress          |
|----------|------------------------|---------------------------------------|----------------------------|
| 0.5.16   | prefetch thread, queue | write MIN, load MIN, drain MIN (4)    | MIN once at termination    |
| 0.5.17   | prefetch thread, queue | one MIN of [write, load, 4 queues]    | MIN once at termination    |
| 0.5.18   | drain (scheduler)      | one MIN of [write, load, 3 queues]    | MIN once at termination    |
| 0.5.19+  | drain (scheduler)      | one MIN of [write, load, 4 queues]    | per-batch acks, sync thread|

0.5.19 / 0.5.20 also decide termination with one MAX of `terminated or can_terminate` in
`check_prefetch_progress` (no collective in `can_terminate_prefetch`) and their
`release_aborted_request` has no barrier.

How the Schedule controls the threads (the same choices, read at the same decision points as
for 0.5.9 .. 0.5.15.post1; see seams.SglangPacer):
- hit query: every rank waits for it right after `prefetch_from_storage` (it all-reduces);
  done = the operation is on the hit queue (or, 0.5.16/0.5.17, on the revoke queue);
- IO thread ("get"): an operation enters when the drain puts it on `prefetch_buffer`; each
  `batch_get` waits at a gate the Schedule opens; it is done when the IO thread has finished it
  (0.5.16 .. 0.5.18: it releases the unfetched tail; 0.5.19+: it queues the final ack);
- per-batch acks (0.5.19+): the sync thread all-reduces each progress ack in the background.
  Before a step reads its queue sizes, every rank has opened this step's gates (a harness
  all-gather of how many acks each rank produced), then waits until its sync thread has agreed
  every ack that can be agreed now, and no more can: the counts a step reads are a function of
  the Schedule, not of thread timing.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from scenarios.sut.sglang import pp_drain, server_cache
from scenarios.sut.sglang.seams import GateTimeout, count_puts, leading_done, record_terminated

#: `_drain_storage_control_queues_impl` parameter -> the controller queue it drains
QUEUE_OF = {"n_revoke": "prefetch_revoke_queue", "n_storage_hit": "prefetch_hit_queue",
            "n_ack_prefetch": "ack_prefetch_queue", "n_backup": "ack_backup_queue",
            "n_release": "host_mem_release_queue"}
#: each ack kind: the decision point whose Schedule choice opens its copy events, its queue
ACK_POINT = {"write": ("writing_check", "ack_write_queue"),
             "load": ("loading_check", "ack_load_queue")}


def uses_hit_queue(cc: Any) -> bool:
    return cc is not None and hasattr(cc, "prefetch_hit_queue")


class HitQueuePipeline:
    """Installs the hooks on one freshly built cache; `driver` provides pacer, gates, _decide."""

    def __init__(self, driver: Any, cache: Any, cc: Any) -> None:
        self.d = driver
        self.cache = cache
        self.cc = cc
        self.gates = driver.gates
        self.pacer = driver.pacer
        impl = cache._drain_storage_control_queues_impl
        self.drain_params = [p for p in inspect.signature(impl).parameters if p in QUEUE_OF]
        self.combined = hasattr(cache, "_sync_hicache_ready_counts")
        self.per_batch_acks = hasattr(cc, "prefetch_sync_queue")
        self.local: dict[str, Any] = {}
        self.in_sync = False  # inside the release's _sync_hicache_ready_counts
        # per-batch acks: produced (into prefetch_sync_queue) / agreed (into ack_prefetch_queue)
        self.lock = threading.Lock()
        self.acks_in: list[bool] = []  # per ack in order: does the sync thread all-reduce it?
        self.acks_out = 0
        self.capture: list | None = None

    # -- queues: operations in and out of each thread ------------------------------------------
    def install(self) -> None:
        g, cc = self.gates, self.cc
        count_puts(cc.prefetch_queue, lambda _op: g.op_in("query"))
        count_puts(cc.prefetch_hit_queue, lambda _op: g.op_out("query"))
        if hasattr(cc, "prefetch_revoke_queue"):  # 0.5.16 / 0.5.17: revoked by the thread
            count_puts(cc.prefetch_revoke_queue, lambda _rid: g.op_out("query"))
        count_puts(cc.prefetch_buffer, lambda _op: g.op_in("get"))
        count_puts(cc.backup_queue, lambda _op: g.op_in("set"))
        count_puts(cc.ack_backup_queue, lambda _op: g.op_out("set"))
        if self.per_batch_acks:
            count_puts(cc.prefetch_sync_queue, self._ack_produced)
            count_puts(cc.ack_prefetch_queue, self._ack_agreed)
            self._hook_reduce_ack()
        else:
            orig_release = cc.append_host_mem_release

            def append_host_mem_release(host_indices: torch.Tensor) -> None:
                orig_release(host_indices)
                if "prefetch_io_aux" in threading.current_thread().name:
                    g.op_out("get")  # the IO thread releases the unfetched tail, always
            cc.append_host_mem_release = append_host_mem_release
        self._hook_capture()
        self._hook_decisions()

    def _ack_produced(self, ack: Any) -> None:
        with self.lock:
            self.acks_in.append(getattr(ack, "completed_tokens", None) is not None)
        if getattr(ack, "completed_req", None):
            self.gates.op_out("get")  # the IO thread is done with this operation

    def _ack_agreed(self, _ack: Any) -> None:
        with self.lock:
            self.acks_out += 1
        with self.gates.cond:
            self.gates.cond.notify_all()

    def _hook_reduce_ack(self) -> None:
        cc, d = self.cc, self.d
        orig = cc._reduce_prefetch_ack

        def reduce_prefetch_ack(ack: Any) -> Any:
            local = ack.completed_tokens
            out = orig(ack)
            if local is not None:  # the per-batch progress agreement (a background thread)
                d.decisions["prefetch_sync"].append(
                    ["prefetch_progress", ack.rid, [int(local)], [int(ack.completed_tokens)],
                     f"{int(ack.completed_tokens)} tokens"])
            return out
        cc._reduce_prefetch_ack = reduce_prefetch_ack

    def _hook_capture(self) -> None:
        """Record the tensor a scheduler-side agreement sends and gets back, unchanged."""
        for name in ("_all_reduce", "_all_reduce_attn_groups"):
            orig = getattr(self.cache, name, None)
            if orig is None:
                continue

            def wrapped(tensor: torch.Tensor, op: Any, _orig: Any = orig) -> Any:
                before = tensor.flatten().tolist()
                out = _orig(tensor, op)
                if self.capture is not None:  # only the scheduler thread calls these
                    self.capture.append((before, tensor.flatten().tolist()))
                return out
            setattr(self.cache, name, wrapped)

    # -- the agreed ack counts: wait until every ack that can be agreed now has been ------------
    def settle_acks(self) -> None:
        if not self.per_batch_acks:
            return
        st = self.d.st
        with self.lock:
            mine = len(self.acks_in)
        t = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=st["harness"])
        # every rank has produced the first `min` acks; the ones after need no peer if they
        # carry no count (final acks), so the sync thread gets through them alone
        deadline = time.monotonic() + self.gates.timeout_s
        with self.lock:
            target = int(t.item())
            while target < len(self.acks_in) and not self.acks_in[target]:
                target += 1
        with self.gates.cond:
            while True:
                with self.lock:
                    if self.acks_out >= target:
                        return
                left = deadline - time.monotonic()
                if left <= 0 or self.gates.thread_errors:
                    raise GateTimeout(
                        f"rank {self.gates.rank}: the prefetch sync thread agreed "
                        f"{self.acks_out} of {target} progress acks in "
                        f"{self.gates.timeout_s:.0f} s" +
                        (f"; died: {self.gates.thread_errors}" if self.gates.thread_errors
                         else ""))
                self.gates.cond.wait(min(left, 0.05))

    def _queue_sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self.cc, QUEUE_OF[p]).qsize() for p in self.drain_params)

    def _before_reads(self) -> None:
        """The Schedule's choices for write / load events and backup IO, then a settled IO
        thread and agreed acks: what the step's agreement reads is fixed from here."""
        p = self.pacer
        p.io("drain", "set")
        if p.drain:  # the end of the run: every IO thread finishes its work
            p.io("drain", "get")
        self.gates.settle("get")
        self.settle_acks()

    # -- decision points -----------------------------------------------------------------------
    def _hook_ready_counts(self) -> None:
        """0.5.19 under PP counts stage 0's ready acks itself (`_count_ready_acks`, outside
        `_sync_hicache_ready_counts`) before one MIN and `writing_check(finish_count=...)`:
        the Schedule's events open, and the local count is taken, where the release counts."""
        cache, cc = self.cache, self.cc
        orig_count = getattr(cache, "_count_ready_acks", None)
        if orig_count is None:
            return

        def count_ready_acks(queue: Any) -> Any:
            if not self.in_sync:
                key = "write" if queue is cc.ack_write_queue else "load"
                self.local[key] = self._paced_count(key)
            return orig_count(queue)
        cache._count_ready_acks = count_ready_acks

    def _paced_count(self, key: str) -> int:
        """Open the Schedule's copy events of ack kind `key` ("write" / "load") at its decision
        point, then count the acks at the head of its queue whose events fired."""
        point, queue = ACK_POINT[key]
        self.pacer.events(point, key)
        return sum(1 for _ in leading_done(getattr(self.cc, queue)))

    def _counted(self, key: str) -> Any:
        """The ack count this step read for `key` ("write" / "load"), once. A later PP stage
        that took stage 0's count without counting (0.5.19) opens its events here: None, as
        the release reads no local count there."""
        if key in self.local:
            return self.local.pop(key)
        self.pacer.events(ACK_POINT[key][0], key)
        return None

    def _hook_decisions(self) -> None:

        cache, cc, d, p = self.cache, self.cc, self.d, self.pacer
        orig_writing, orig_loading = cache.writing_check, cache.loading_check
        orig_impl = cache._drain_storage_control_queues_impl

        def writing_check(write_back: bool = False, finish_count: int | None = None) -> Any:
            if write_back:
                return orig_writing(write_back=True)
            local = (self._paced_count("write") if finish_count is None
                     else self._counted("write"))
            before = len(cc.ack_write_queue)
            out = (orig_writing() if finish_count is None
                   else orig_writing(finish_count=finish_count))
            agreed = before - len(cc.ack_write_queue)
            d._decide("writing_check", "", (local,), (agreed,), f"ack {agreed} writes")
            return out

        def loading_check(finish_count: int | None = None) -> Any:
            local = (self._paced_count("load") if finish_count is None
                     else self._counted("load"))
            before = len(cc.ack_load_queue)
            out = orig_loading() if finish_count is None else orig_loading(finish_count=finish_count)
            agreed = before - len(cc.ack_load_queue)
            d._decide("loading_check", "", (local,), (agreed,), f"ack {agreed} loads")
            return out

        cache.writing_check = writing_check
        cache.loading_check = loading_check

        if self.combined:  # 0.5.17+: one MIN over [write, load, queue sizes] per step
            orig_sync = cache._sync_hicache_ready_counts

            def sync_hicache_ready_counts() -> Any:
                p.events("writing_check", "write")
                p.events("loading_check", "load")
                self._before_reads()
                self.local["write"] = sum(1 for _ in leading_done(cc.ack_write_queue))
                self.local["load"] = sum(1 for _ in leading_done(cc.ack_load_queue))
                self.local["queues"] = self._queue_sizes()
                self.in_sync = True
                try:
                    return orig_sync()
                finally:
                    self.in_sync = False
            cache._sync_hicache_ready_counts = sync_hicache_ready_counts
            self._hook_ready_counts()
        # the separate drain (0.5.16; with PP in later releases)
        orig_drain = cache.drain_storage_control_queues

        def drain() -> Any:
            self._before_reads()
            self.local["queues"] = self._queue_sizes()
            return orig_drain()
        cache.drain_storage_control_queues = drain

        revoke_name = server_cache.alias(cache, "_revoke_pending_prefetch")
        orig_revoke = getattr(cache, revoke_name)
        self.revoked = 0

        def revoke_pending_prefetch(req_id: Any) -> Any:
            self.revoked += int(req_id in cache.ongoing_prefetch)
            return orig_revoke(req_id)
        setattr(cache, revoke_name, revoke_pending_prefetch)

        def drain_impl(**kw: Any) -> Any:
            self.revoked = 0
            opened: list[str] = []
            pp_drain.wait_for_forwarded_counts(cache, cc, {
                p: (QUEUE_OF[p], kw.get(p)) for p in self.drain_params}, d.gates, opened)
            d.pacer.trace.extend(("pp_drain", stream, 1) for stream in opened)
            out = orig_impl(**kw)
            agreed = tuple(kw.get(n) for n in self.drain_params)
            if None not in agreed:  # a local drain (shutdown) agrees on nothing
                d._decide("drain", "", self.local.get("queues", ()), agreed,
                          self._drain_outcome(dict(zip(self.drain_params, agreed, strict=True))))
            return out
        cache._drain_storage_control_queues_impl = drain_impl

        if self.per_batch_acks:
            self._hook_progress_0519()
        else:
            self._hook_progress_0516()

        orig_handle = getattr(cache, "_handle_prefetch_result", None)
        if orig_handle is not None:  # 0.5.19+: insert the count the acks agreed
            def handle_prefetch_result(operation: Any) -> Any:
                d._current_rid = operation.request_id
                d._last_completed = operation.completed_tokens
                return orig_handle(operation)
            cache._handle_prefetch_result = handle_prefetch_result

    def _drain_outcome(self, n: dict[str, int]) -> str:
        """The reference's words first (revoked prefetches, backup acks, host releases; what
        differential mode compares), then what only the hit-queue pipeline has."""
        extra = [f"hit queue {n['n_storage_hit']}"]
        if "n_ack_prefetch" in n:
            extra.append(f"prefetch acks {n['n_ack_prefetch']}")
        return (f"revoke {self.revoked}, backup acks {n['n_backup']}, release "
                f"{n['n_release']}; " + ", ".join(extra))

    def _hook_progress_0516(self) -> None:
        """0.5.16 .. 0.5.18: `can_terminate_prefetch` agrees MAX [1 - can, terminated]; the
        completed count is frozen at termination and agreed once (MIN)."""
        cache, cc, d, p = self.cache, self.cc, self.d, self.pacer
        orig_can = cache.can_terminate_prefetch

        def can_terminate_prefetch(operation: Any) -> bool:
            p.io("prefetch_progress", "get")
            self.capture = []
            try:
                out = orig_can(operation)
            finally:
                cap, self.capture = self.capture, None
            if cap:
                local, agreed = cap[-1]
            else:  # best_effort: every rank may stop, no collective
                local = agreed = [0, 0]
            d._decide("can_terminate", operation.request_id, tuple(local), tuple(agreed),
                      "terminate" if out else "wait")
            return out
        cache.can_terminate_prefetch = can_terminate_prefetch

        record_terminated(cc, d)

    def _hook_progress_0519(self) -> None:
        """0.5.19+: `check_prefetch_progress` agrees one MAX of `stop = terminated or
        can_terminate`. Logged in the oracle's [1 - can, terminated] shape as [1 - can, stop]
        with can = 1 only under best_effort (every rank can always stop there) and 0
        otherwise: the MAX of that is [1 - can, MAX stop], and "terminate iff can or MAX stop"
        is exactly this release's decision."""
        cache, cc, d, p = self.cache, self.cc, self.d, self.pacer
        orig_check = cache.check_prefetch_progress
        orig_terminate = cc.terminate_prefetch
        can = int(cache.prefetch_stop_policy == "best_effort")

        def log_stop(rid: Any, out: bool) -> None:
            cap = self.capture or []
            if cap:
                (stop_l,), (stop_a,) = cap[0]
                d._decide("can_terminate", rid, (1 - can, int(stop_l)), (1 - can, int(stop_a)),
                          "terminate" if stop_a else "wait")
            else:  # UnifiedRadixCache: `terminated or can` with no collective (but under the
                # timeout policy): each rank's own decision, which every rank must share
                d._decide("can_terminate", rid, (1 - can, int(out)), (1 - can, int(out)),
                          "terminate" if out else "wait")

        def terminate_prefetch(operation: Any) -> Any:
            # the release decided to stop (`should_terminate`): logged here, before the
            # insert `_handle_prefetch_result` logs, in the order the release decides them
            pending, self.stop_pending = self.stop_pending, None
            if pending is not None:
                log_stop(pending, True)
            return orig_terminate(operation)
        cc.terminate_prefetch = terminate_prefetch
        self.stop_pending = None

        @functools.wraps(orig_check)  # keeps the parameter name adapters reads (`handle`)
        def check_prefetch_progress(arg: Any) -> bool:
            rid = getattr(arg, "rid", arg)
            if rid not in cache.ongoing_prefetch and arg not in cache.ongoing_prefetch:
                return orig_check(arg)  # (UnifiedRadixCache keys by the handle)
            p.io("prefetch_progress", "get")
            self.capture, self.stop_pending = [], rid
            try:
                out = orig_check(arg)
                if self.stop_pending is not None:  # no terminate_prefetch: "wait"
                    log_stop(rid, out)
            finally:
                self.capture, self.stop_pending = None, None
            return out
        cache.check_prefetch_progress = check_prefetch_progress


def io_busy(d: Any, cc: Any) -> bool:
    """Work still queued in the hit-queue pipeline (the end-of-run drain goes on while so)."""
    pipe = getattr(d, "pipeline", None)
    queued = any(getattr(cc, q).qsize() for q in
                 ("prefetch_hit_queue", "ack_prefetch_queue", "prefetch_sync_queue",
                  "prefetch_revoke_queue") if hasattr(cc, q))
    acks = pipe is not None and pipe.per_batch_acks and pipe.acks_out != len(pipe.acks_in)
    return bool(queued or acks)
