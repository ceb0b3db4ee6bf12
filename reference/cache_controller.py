"""HiCacheController: the per-rank IO threads, their queues and acks (SGLang's names).

Threads, each with its own pace on each rank:
- writer: device -> host copies (write-through); an ack per operation
- loader: host -> device copies (load-back); an ack per operation
- prefetch: L3 hit query, then agreement (MIN) on the hit count; revoke below the threshold
- prefetch IO aux: L3 -> L2 page transfer in batches; counts the tokens that landed. With the
  profile's per_batch_acks (0.5.20) it also sends one progress ack per batch, always the same
  number of acks on every rank, even after an error
- prefetch sync (per_batch_acks only): agrees (MIN) on each progress ack
- backup: L2 -> L3 writes; an ack per operation
The scheduler side (HiRadixCache) consumes acks only after agreeing how many to consume.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reference.hashing import KeySuffix, page_hashes
from reference.memory_pool import DeviceKVPool, HostKVPool, device_to_host, host_to_device
from reference.observer import Decision, Effect, HitsEffect, Observer, StorageAccess
from reference.pacing import Pacer
from reference.profiles import DEFAULT_PROFILE, ProtocolProfile, get_profile
from reference.storage.base import HiCacheStorage
from reference.sync import Collectives, ParallelGroups, SyncGroup, sync_plan

logger = logging.getLogger(__name__)

STOP_POLICIES = ("best_effort", "wait_complete", "timeout")
WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")


class HiCacheError(RuntimeError):
    """The cache cannot go on safely (a peer never agreed, a thread died)."""


class HiCacheAck:
    """Completion of one copy: a CUDA event on GPU, a threading.Event set by the copy thread."""

    def __init__(self, seq: int, node_ids: list[int]) -> None:
        self.seq = seq
        self.node_ids = node_ids
        self._done = threading.Event()
        self.cuda_event: torch.cuda.Event | None = None

    def finished(self) -> bool:
        if not self._done.is_set():
            return False
        return self.cuda_event is None or self.cuda_event.query()

    def wait(self, timeout: float) -> bool:
        if not self._done.wait(timeout):
            return False
        if self.cuda_event is not None:
            self.cuda_event.synchronize()
        return True


@dataclass
class CacheOperation:
    seq: int  # the op's first unit on its pacer stream; its ack's seq is the last
    host_indices: torch.Tensor
    device_indices: torch.Tensor
    ack: HiCacheAck
    units: int = 1


@dataclass
class PrefetchAck:
    """Progress of one prefetch on this rank: sent once per batch, then once with final=True."""

    operation: PrefetchOperation
    completed_tokens: int
    final: bool = False


@dataclass
class StorageOperation:
    seq: int
    host_indices: torch.Tensor
    token_ids: list[int]
    last_hash: str | None
    hash_value: list[str] = field(default_factory=list)
    node_id: int = -1


class PrefetchOperation(StorageOperation):
    """One request's L3 -> L2 fetch. `completed_tokens` is local; `agreed_tokens` is agreed."""

    def __init__(self, seq: int, request_id: str, host_indices: torch.Tensor,
                 token_ids: list[int], last_hash: str | None, start_time: float) -> None:
        super().__init__(seq, host_indices, token_ids, last_hash)
        self.request_id = request_id
        self.start_time = start_time
        self.storage_hit_count = 0  # agreed, in pages
        self.completed_tokens = 0  # this rank, contiguous prefix that landed in host memory
        self.agreed_tokens = 0  # MIN over ranks of completed_tokens, at the last agreed ack
        self.num_batches = 0
        self.first_batch = 0  # this op's batches are prefetch_io units first_batch.. on
        self.keys: list[str] = []  # hash_value's storage keys, page by page: built once
        self.revoked = False
        self.io_done = False  # this rank's IO thread sent its final ack
        self.query_done = threading.Event()
        self.final_agreed = threading.Event()
        self._lock = threading.Lock()
        self._terminated = False
        #: (completed_tokens, terminated) after each batch the IO thread finished, so a decision
        #: can read the op as its pacer saw it (a batch may finish mid-decision)
        self._after_batch: list[tuple[int, bool]] = []
        self.batches_seen: int | None = None  # what the last progress check saw of its batches

    def mark_terminate(self) -> int:
        """Stop the IO; returns the completed tokens frozen at that moment."""
        with self._lock:
            self._terminated = True
            return self.completed_tokens

    def increment(self, completed_tokens: int) -> bool:
        """The IO thread counts a landed batch, unless the op was terminated meanwhile."""
        with self._lock:
            if self._terminated:
                return False
            self.completed_tokens = completed_tokens
            return True

    def is_terminated(self) -> bool:
        with self._lock:
            return self._terminated

    def batch_finished(self) -> None:
        """The IO thread is done with one more batch (called before it tells the pacer)."""
        with self._lock:
            self._after_batch.append((self.completed_tokens, self._terminated))

    def progress_at(self, batches: int | None) -> tuple[int, bool]:
        """(completed_tokens, terminated) once the op's first `batches` batches were done:
        what a pacer that saw only those reports; all of them (or None, or more than have
        finished: a released pacer stops waiting) reads the op now."""
        with self._lock:
            if batches is None or batches >= self.num_batches or batches > len(self._after_batch):
                return self.completed_tokens, self._terminated
            return self._after_batch[batches - 1] if batches else (0, False)


@dataclass
class ControllerConfig:
    page_size: int
    write_policy: str = "write_through"
    prefetch_threshold: int = 0  # tokens; SGLang clamps it to at least one page
    prefetch_batch_pages: int = 2
    prefetch_stop_policy: str = "best_effort"
    prefetch_timeout_s: float = 1.0
    variant: str = "fixed"
    agree_timeout_s: float = 60.0
    profile: ProtocolProfile = field(default_factory=lambda: get_profile(DEFAULT_PROFILE))


class HiCacheController:
    def __init__(
        self,
        device_pool: DeviceKVPool,
        host_pool: HostKVPool,
        config: ControllerConfig,
        collectives: Collectives,
        groups: ParallelGroups,
        key_suffix: KeySuffix,
        storage: HiCacheStorage | None,
        pacer: Pacer,
        observer: Observer,
        backup_skip: bool = False,
    ) -> None:
        if config.write_policy not in WRITE_POLICIES:
            raise ValueError(f"invalid write policy: {config.write_policy}")
        if config.prefetch_stop_policy not in STOP_POLICIES:
            raise ValueError(f"invalid prefetch stop policy: {config.prefetch_stop_policy}")
        self.cfg = config
        self.page_size = config.page_size
        self.mem_pool_device = device_pool
        self.mem_pool_host = host_pool
        self.storage_backend = storage
        self.enable_storage = storage is not None
        self.key_suffix = key_suffix
        self.pacer = pacer
        self.observer = observer
        self.variant = config.variant
        self.backup_skip = backup_skip
        self.prefetch_threshold = max(config.prefetch_threshold, self.page_size)
        #: what the agreed hit is revoked below: the clamped threshold above (to 0.5.17), or
        #: the cache's own as configured (0.5.18+ revoke at the drain against it)
        self.revoke_threshold = (config.prefetch_threshold
                                 if config.profile.revoke_threshold == "cache"
                                 else self.prefetch_threshold)
        # SGLang's rate limit on storage prefetches: tokens held by prefetches in flight,
        # updated by the scheduler thread only (so every rank refuses the same prefetch)
        host, device = host_pool.allocator.size, device_pool.allocator.size
        self.prefetch_capacity_limit = (int(0.5 * host)
                                        if config.profile.prefetch_capacity == "half_host"
                                        else max(0, int(0.8 * (host - device))))
        self.prefetch_tokens_occupied = 0

        self.profile = config.profile
        plan = sync_plan(groups, config.profile)
        #: SGLang's name for the rank sets every agreement all-reduces over, in order
        self.prefetch_sync_groups = plan.all_reduce
        # separate gloo groups per thread, as SGLang does: reductions of different threads
        # must never pair up with each other. Every scheduler-thread agreement shares `control`
        # (in SGLang the scheduler's groups, shared with its request broadcast): one skipped
        # there mispairs with the next one.
        self.prefetch_hits_sync = SyncGroup(collectives, plan, "prefetch_hits")
        self.per_batch_acks = config.profile.prefetch_progress == "per_batch_acks"
        if self.per_batch_acks:
            self.prefetch_completion_sync = SyncGroup(collectives, plan, "prefetch_completion")
        self.control_sync = SyncGroup(collectives, plan, "control")
        #: `writing_check` / `loading_check`: the same groups, plus (0.5.13 only) PP rank 0's
        #: count forwarded down the pipeline; the very same SyncGroup for every other profile
        ack_plan = sync_plan(groups, config.profile, acks=True)
        self.ack_sync = (self.control_sync if ack_plan == plan
                         else SyncGroup(collectives, ack_plan, "control"))

        self.ack_write_queue: list[HiCacheAck] = []
        self.ack_load_queue: list[HiCacheAck] = []
        self.prefetch_revoke_queue: queue.Queue[str] = queue.Queue()
        self.ack_backup_queue: queue.Queue[StorageOperation] = queue.Queue()
        self.host_mem_release_queue: queue.Queue[torch.Tensor] = queue.Queue()
        #: (prefetch_io unit, host pages) the IO thread gave back, held until a pacer has seen
        #: that unit finish (`host_mem_releases` queues them then)
        self._io_releases: list[tuple[int, torch.Tensor]] = []
        self._io_release_lock = threading.Lock()
        self.prefetch_ops_buffered = 0  # ops handed to the IO thread
        self.prefetch_ops_finished = 0  # ops whose IO thread sent its final ack

        self._write_queue: queue.Queue[CacheOperation | None] = queue.Queue()
        self._load_queue: queue.Queue[CacheOperation | None] = queue.Queue()
        self.prefetch_queue: queue.Queue[PrefetchOperation | None] = queue.Queue()
        self.prefetch_buffer: queue.Queue[PrefetchOperation | None] = queue.Queue()
        self.prefetch_sync_queue: queue.Queue[PrefetchAck | None] = queue.Queue()
        self.backup_queue: queue.Queue[StorageOperation | None] = queue.Queue()

        self.write_seq = 0
        self.load_seq = 0
        self.prefetch_seq = 0
        self.backup_seq = 0
        self.prefetch_batches_issued = 0
        self.get_calls = 0  # L3 reads by the IO thread, in order: what a pacer's faults name
        self.exists_calls = 0  # L3 hit queries actually made (none for a 0-page prefetch)
        self.stop_event = threading.Event()
        self.thread_errors: list[str] = []
        self.thread_exceptions: list[BaseException] = []  # the first is check_threads' cause
        self._host_part_views: dict[int, tuple[torch.Tensor, ...]] = {}

        cuda = device_pool.device.type == "cuda"
        self.write_stream = torch.cuda.Stream(device_pool.device) if cuda else None
        self.load_stream = torch.cuda.Stream(device_pool.device) if cuda else None
        if storage is not None:  # zero-copy backends register the host pool once, up front
            storage.register_mem_pool_host(host_pool.buffer)

        targets: list[tuple[str, Callable[[], None]]] = [
            ("hicache-writer", self._writer_thread_func),
            ("hicache-loader", self._loader_thread_func),
        ]
        if self.enable_storage:
            targets += [
                ("hicache-prefetch", self.prefetch_thread_func),
                ("hicache-prefetch-io", self.prefetch_io_aux_func),
                ("hicache-backup", self.backup_thread_func),
            ]
            if self.per_batch_acks:
                targets.append(("hicache-prefetch-sync", self.prefetch_sync_thread_func))
        self.threads = [
            threading.Thread(target=self._guard(fn), name=name, daemon=True) for name, fn in targets
        ]
        for t in self.threads:
            t.start()

    # -- plumbing ---------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as e:  # a dead IO thread must surface, not hang the scheduler
                if not self.stop_event.is_set():
                    msg = f"{threading.current_thread().name}: {type(e).__name__}: {e}"
                    self.thread_errors.append(msg)
                    self.thread_exceptions.append(e)
                    logger.warning("HiCache thread died: %s", msg)

        return run

    def check_threads(self) -> None:
        if self.thread_errors:
            raise HiCacheError("; ".join(self.thread_errors)) from self.thread_exceptions[0]

    def decide(self, channel: str, kind: str, rid: str, local: tuple[int, ...],
               agreed: tuple[int, ...], outcome: str, effect: Effect | tuple[()] = ()) -> None:
        self.observer.on_decision(Decision(channel, kind, rid, local, agreed, outcome, effect))

    def host_page_parts(self, host_indices: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """`mem_pool_host.page_parts`, through views made once per page: slicing every part of
        every page per IO batch cost as much as moving 64 KiB parts (bench_mooncake_prefetch)."""
        ps = self.page_size
        views = self._host_part_views
        out = []
        for start in host_indices.view(-1, ps)[:, 0].tolist():
            page = start // ps
            parts = views.get(page)
            if parts is None:
                parts = views[page] = tuple(self.mem_pool_host.page_parts(
                    host_indices.new_tensor([start] * ps))[0])
            out.append(parts)
        return out

    def storage_keys(self, hash_value: list[str]) -> list[list[str]]:
        """Per page, its keys in KVShape.parts order."""
        parts = self.mem_pool_host.shape.parts
        return [[self.key_suffix.key(h, p) for p in parts] for h in hash_value]

    def flat_storage_keys(self, hash_value: list[str]) -> list[str]:
        """`storage_keys` flattened (page by page), the order every storage call takes."""
        return self.key_suffix.keys(hash_value, self.mem_pool_host.shape.parts)

    def shutdown(self) -> None:
        self.stop_event.set()
        for q in (self._write_queue, self._load_queue, self.prefetch_queue,
                  self.prefetch_buffer, self.prefetch_sync_queue, self.backup_queue):
            q.put(None)
        self.pacer.release_all()
        for t in self.threads:
            t.join(timeout=10)

    # -- write (L1 -> L2) and load (L2 -> L1) -----------------------------------------------
    def write(self, device_indices: torch.Tensor, node_id: int) -> torch.Tensor | None:
        host_indices = self.mem_pool_host.allocator.alloc(device_indices.numel())
        if host_indices is None:
            return None
        ack = HiCacheAck(self.write_seq, [node_id])
        self.ack_write_queue.append(ack)
        self._write_queue.put(CacheOperation(self.write_seq, host_indices, device_indices, ack))
        self.write_seq += 1
        return host_indices

    def load(self, host_indices: torch.Tensor, node_id: int) -> tuple[torch.Tensor, HiCacheAck] | None:
        device_indices = self.mem_pool_device.allocator.alloc(host_indices.numel())
        if device_indices is None:
            return None
        # one unit per layer: SGLang's `start_loading` records a load event per layer
        # (`LayerLoadingEvent.complete(i)`) and its ack's finish_event is the last layer's
        layers = self.mem_pool_host.shape.layers
        ack = HiCacheAck(self.load_seq + layers - 1, [node_id])
        self.ack_load_queue.append(ack)
        self._load_queue.put(CacheOperation(self.load_seq, host_indices, device_indices, ack,
                                            layers))
        self.load_seq += layers
        return device_indices, ack

    def _copy_loop(self, q: queue.Queue, stream_name: str, copy: Callable[[CacheOperation], None],
                   cuda_stream: torch.cuda.Stream | None) -> None:
        while not self.stop_event.is_set():
            op = q.get()
            if op is None:
                return
            for unit in range(op.seq, op.ack.seq):  # the layers before the last: the copy
                self.pacer.before(stream_name, unit)  # runs whole (page-first host pool) at
                self.pacer.after(stream_name, unit)   # the last one's gate
            self.pacer.before(stream_name, op.ack.seq)
            if cuda_stream is not None:
                # the KV was produced on the scheduler's stream: order the copy after it
                cuda_stream.wait_stream(torch.cuda.default_stream(cuda_stream.device))
                with torch.cuda.stream(cuda_stream):
                    copy(op)
                    op.ack.cuda_event = torch.cuda.Event()
                    op.ack.cuda_event.record(cuda_stream)
                op.ack.cuda_event.synchronize()
            else:
                copy(op)
            op.ack._done.set()
            self.pacer.after(stream_name, op.ack.seq)

    def _writer_thread_func(self) -> None:
        self._copy_loop(
            self._write_queue, "write",
            lambda op: device_to_host(self.mem_pool_device, self.mem_pool_host,
                                      op.device_indices, op.host_indices),
            self.write_stream,
        )

    def _loader_thread_func(self) -> None:
        self._copy_loop(
            self._load_queue, "load",
            lambda op: host_to_device(self.mem_pool_host, self.mem_pool_device,
                                      op.host_indices, op.device_indices),
            self.load_stream,
        )

    # -- prefetch (L3 -> L2) ----------------------------------------------------------------
    def append_host_mem_release(self, host_indices: torch.Tensor) -> None:
        """Queue host pages for the drain to free, one page per item: the drain agrees on the
        number of pages (SGLang's `append_host_mem_release`)."""
        for first in range(0, host_indices.numel(), self.page_size):
            self.host_mem_release_queue.put(host_indices[first : first + self.page_size])

    def prefetch(self, request_id: str, host_indices: torch.Tensor, token_ids: list[int],
                 last_hash: str | None) -> PrefetchOperation:
        op = PrefetchOperation(self.prefetch_seq, request_id, host_indices, token_ids,
                               last_hash, self.pacer.now())
        self.prefetch_seq += 1
        self.prefetch_queue.put(op)
        return op

    def prefetch_rate_limited(self) -> bool:
        """Refuse a new storage prefetch while too many host tokens are held by prefetches."""
        return self.prefetch_tokens_occupied >= self.prefetch_capacity_limit

    def _storage_hit_query(self, op: PrefetchOperation) -> int:
        """Pages of `op` whose every part exists in L3, as a contiguous prefix."""
        op.hash_value = page_hashes(op.token_ids, self.page_size, op.last_hash)
        flat = op.keys = self.flat_storage_keys(op.hash_value)
        assert self.storage_backend is not None
        if not flat:  # SGLang's query loop makes no `batch_exists` call for 0 pages
            return 0
        self.exists_calls += 1
        if self.pacer.fail("exists", self.exists_calls - 1):  # failed: recorded as failed
            self.observer.on_storage(StorageAccess("exists", tuple(flat[:1]), (False,)))
            return 0
        hit_parts = self.storage_backend.batch_exists(flat)
        self.observer.on_storage(StorageAccess("exists", tuple(flat[: hit_parts + 1])))
        return hit_parts // len(self.mem_pool_host.shape.parts)

    def prefetch_thread_func(self) -> None:
        while not self.stop_event.is_set():
            op = self.prefetch_queue.get()
            if op is None:
                return
            self.pacer.before("prefetch_query", op.seq)
            local = self._storage_hit_query(op)
            (agreed,) = self.prefetch_hits_sync.reduce([local], "min")
            if agreed * self.page_size < self.revoke_threshold:
                op.revoked = True
                op.mark_terminate()
                self.prefetch_revoke_queue.put(op.request_id)
                if self.variant != "leak_on_revoke":  # the bug: never returns them
                    self._return_unfetched(op.host_indices)
                outcome = "revoke"
            else:
                op.storage_hit_count = agreed
                op.hash_value = op.hash_value[:agreed]
                # the pages past the hit are released now, by this thread (as SGLang does)
                self._return_unfetched(op.host_indices[agreed * self.page_size :])
                op.host_indices = op.host_indices[: agreed * self.page_size]
                bp = self.cfg.prefetch_batch_pages
                op.num_batches = (agreed + bp - 1) // bp
                op.first_batch = self.prefetch_batches_issued
                self.prefetch_batches_issued += op.num_batches
                self.prefetch_ops_buffered += 1
                self.prefetch_buffer.put(op)
                outcome = f"fetch {agreed} pages"
            self.decide("prefetch", "prefetch_hits", op.request_id, (local,), (agreed,), outcome,
                        HitsEffect(int(op.revoked), op.storage_hit_count,
                                   len(op.token_ids) // self.page_size))
            op.query_done.set()
            self.pacer.after("prefetch_query", op.seq)

    def _return_unfetched(self, host_indices: torch.Tensor) -> None:
        """Pages of a prefetch past its agreed hit: queued for the drain to free (to 0.5.15),
        or freed now, since 0.5.16+ never allocate them (the profile's `unfetched_pages`)."""
        if self.profile.unfetched_pages == "never_taken":
            self.mem_pool_host.allocator.free(host_indices)
        else:
            self.append_host_mem_release(host_indices)

    def prefetch_io_aux_func(self) -> None:
        """Transfer batches; with per_batch_acks, exactly one progress ack per batch whatever
        happens. Otherwise only count: a failed batch marks the op terminated."""
        bp = self.cfg.prefetch_batch_pages
        ps = self.page_size
        while not self.stop_event.is_set():
            op = self.prefetch_buffer.get()
            if op is None:
                return
            if op.num_batches == 0:  # 0 hits kept (cache threshold 0): the final ack only
                self._finish_io(op)
                continue
            failed = False
            for b in range(op.num_batches):
                self.pacer.before("prefetch_io", op.first_batch + b)
                first, last = b * bp, min((b + 1) * bp, op.storage_hit_count)
                # 0.5.16+ (per_batch_acks) checks termination before a batch's get; before,
                # SGLang's `_page_transfer` gets the batch, then sees the termination when the
                # count does not move (the get of a terminated op still happens)
                if not failed and not (self.per_batch_acks and op.is_terminated()):
                    ok = self._page_transfer(op, b, first, last)
                    if ok:
                        if not op.increment(last * ps) and not self.per_batch_acks:
                            failed = True  # terminated by the controller: no further gets
                    else:
                        failed = True  # later pages would leave a hole: stop transferring
                        if not self.per_batch_acks:
                            op.mark_terminate()
                if self.per_batch_acks:
                    skip = (failed and self.variant == "skip_ack_on_error"
                            and op.completed_tokens < last * ps)  # the bug: no ack for it
                    if not skip:
                        self.prefetch_sync_queue.put(PrefetchAck(op, op.completed_tokens))
                if b == op.num_batches - 1:
                    self._finish_io(op)
                op.batch_finished()
                self.pacer.after("prefetch_io", op.first_batch + b)

    def _finish_io(self, op: PrefetchOperation) -> None:
        """The final ack; `io_done` is set before the last batch reports done to a pacer. The
        pages the IO did not fill (failed or terminated) go back from this thread, as SGLang's
        IO thread returns them after `_page_transfer`."""
        unfilled = op.host_indices[op.completed_tokens :]
        if unfilled.numel():
            with self._io_release_lock:
                self._io_releases.append((op.first_batch + op.num_batches - 1, unfilled))
        if self.per_batch_acks:
            self.prefetch_sync_queue.put(PrefetchAck(op, op.completed_tokens, final=True))
        op.io_done = True
        self.prefetch_ops_finished += 1

    def host_mem_releases(self) -> int:
        """The pages queued for the drain to release. Pages the IO thread gave back after a
        batch no decision has seen finish stay out (a free-running recording runs ahead of its
        replay there); gated or in production, every finished batch's pages are queued."""
        seen = self.pacer.seen("prefetch_io")
        with self._io_release_lock:
            held = []
            for unit, pages in self._io_releases:
                if seen is not None and unit >= seen:
                    held.append((unit, pages))
                else:
                    self.append_host_mem_release(pages)
            self._io_releases = held
        return self.host_mem_release_queue.qsize()

    def prefetch_io_busy(self) -> bool:
        """An op the IO thread has not finished, or pages it gave back not yet queued (an
        aborted op's batch runs when its gate opens, after the abort)."""
        with self._io_release_lock:
            return (self.prefetch_ops_finished < self.prefetch_ops_buffered
                    or bool(self._io_releases))

    def _page_transfer(self, op: PrefetchOperation, batch: int, first: int, last: int) -> bool:
        ps = self.page_size
        dst_first = first + 1 if (self.variant == "misaligned_batch" and batch > 0) else first
        n_pages_host = op.host_indices.numel() // ps
        if dst_first + (last - first) > n_pages_host:
            dst_first = first
        host = op.host_indices[dst_first * ps : (dst_first + last - first) * ps]
        n_parts = len(self.mem_pool_host.shape.parts)
        keys = op.keys[first * n_parts : last * n_parts]  # built by the hit query
        assert self.storage_backend is not None
        zero_copy = self.storage_backend.zero_copy
        wants_sums = self.observer.wants_checksums
        targets = ([t for page in self.host_page_parts(host) for t in page]
                   if wants_sums or not zero_copy else [])
        self.get_calls += 1
        if self.pacer.fail("get", self.get_calls - 1):
            results = [False] * len(keys)
        elif zero_copy:
            results = self._page_get_zero_copy(keys, host)
        else:  # SGLang's _generic_page_get: through each page part's tensor
            results = self.storage_backend.batch_get(keys, targets)
        sums = (tuple(_checksum(t) if ok else "" for t, ok in zip(targets, results, strict=True))
                if wants_sums else ())
        self.observer.on_storage(StorageAccess("get", tuple(keys), tuple(results), sums))
        return all(results)

    def _page_get_zero_copy(self, keys: list[str], host: torch.Tensor) -> list[bool]:
        """SGLang's `_page_get_zero_copy` (`batch_get_v1`): one read straight into the host
        pool, addresses from `get_page_buffer_meta`, no per-page tensors."""
        assert self.storage_backend is not None
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host)
        return self.storage_backend.batch_get_into(keys, ptrs, sizes)

    def prefetch_sync_thread_func(self) -> None:
        while not self.stop_event.is_set():
            ack = self.prefetch_sync_queue.get()
            if ack is None:
                return
            op = ack.operation
            (agreed,) = self.prefetch_completion_sync.reduce([ack.completed_tokens], "min")
            op.agreed_tokens = agreed
            kind = "prefetch_final" if ack.final else "prefetch_progress"
            self.decide("prefetch_sync", kind, op.request_id, (ack.completed_tokens,), (agreed,),
                        f"{agreed} tokens")
            if ack.final:
                op.final_agreed.set()

    # -- backup (L2 -> L3) ------------------------------------------------------------------
    def write_storage(self, host_indices: torch.Tensor, token_ids: list[int],
                      hash_value: list[str], node_id: int) -> int:
        op = StorageOperation(self.backup_seq, host_indices, token_ids, None, hash_value, node_id)
        self.backup_seq += 1
        self.backup_queue.put(op)
        return op.seq

    def backup_thread_func(self) -> None:
        while not self.stop_event.is_set():
            op = self.backup_queue.get()
            if op is None:
                return
            self.pacer.before("backup", op.seq)
            if not self.backup_skip:
                keys = self.flat_storage_keys(op.hash_value)
                values = [t for page in self.host_page_parts(op.host_indices) for t in page]
                assert self.storage_backend is not None
                if self.pacer.fail("set", op.seq):
                    results = [False] * len(keys)
                else:
                    results = self.storage_backend.batch_set(keys, values)
                sums = (tuple(_checksum(v) for v in values)
                        if self.observer.wants_checksums else ())
                self.observer.on_storage(StorageAccess("set", tuple(keys), tuple(results), sums))
            self.ack_backup_queue.put(op)
            self.pacer.after("backup", op.seq)


def _checksum(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.blake2b(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()),
                           digest_size=8).hexdigest()
