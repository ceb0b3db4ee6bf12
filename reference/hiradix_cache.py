"""HiRadixCache: the tree plus the controller, and the decision points where ranks agree.

Each decision point reads a local value (what this rank's threads have finished), reduces it
over the sync groups and acts only on the agreed value, exactly as SGLang's hiradix_cache.py:
`writing_check`, `loading_check`, `drain_storage_control_queues`, `can_terminate_prefetch`,
`check_prefetch_progress`. Where releases differ, the code reads `self.profile.<field>`
(reference/profiles.py lists every difference in one table).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import torch

from reference.cache_controller import (
    ControllerConfig,
    HiCacheAck,
    HiCacheController,
    HiCacheError,
    PrefetchOperation,
)
from reference.hashing import KeySuffix, storage_tp_rank
from reference.memory_pool import DeviceKVPool, HostKVPool, KVShape
from reference.observer import NULL_OBSERVER, AckEffect, DrainEffect, Effect, Observer, ProgressSeen
from reference.pacing import FREE_RUNNING, Pacer
from reference.profiles import DEFAULT_PROFILE
from reference.radix_tree import MatchResult, RadixTree, TreeNode
from reference.storage.base import HiCacheStorage
from reference.sync import Collectives, ParallelGroups
from reference.variants import effective_configuration


def _finished_prefix(acks: list[HiCacheAck], seen: int) -> int:
    """SGLang's `finish_count` loop: queued acks finished in order, up to the first that is
    not, counting only units the pacer's snapshot says are done (`seen`, from `at`)."""
    count = 0
    for ack in acks:
        if ack.seq >= seen or not ack.finished():
            break
        count += 1
    return count


class AgreementTimeout(HiCacheError):
    """A peer never agreed in time: this rank waited on another one, it did not fail itself."""


@dataclass(frozen=True)
class RankInfo:
    tp_rank: int = 0
    tp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 4
    device_pages: int = 64
    host_pages: int = 128
    kv: KVShape = KVShape()
    write_policy: str = "write_through"
    write_through_threshold: int = 2  # hits before write_through_selective writes a node
    prefetch_threshold: int = 0
    prefetch_batch_pages: int = 2
    prefetch_stop_policy: str = "best_effort"
    prefetch_timeout_s: float = 1.0
    variant: str = "fixed"
    protocol: str = DEFAULT_PROFILE  # a name in reference.profiles.PROFILES
    #: SGLang's --enable-dp-attention: the cache's TP group is the attention-TP group and MHA
    #: keys carry the attention-TP rank; without it, the full TP group and the global TP rank
    enable_dp_attention: bool = True
    key_prefix: str = ""
    agree_timeout_s: float = 60.0


@dataclass
class OngoingPrefetch:
    last_host_node: TreeNode
    token_ids: list[int]
    host_indices: torch.Tensor
    operation: PrefetchOperation


class HiRadixCache:
    def __init__(
        self,
        config: CacheConfig,
        rank: RankInfo,
        groups: ParallelGroups,
        collectives: Collectives,
        storage: HiCacheStorage | None = None,
        device: torch.device | None = None,
        pacer: Pacer = FREE_RUNNING,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.cfg = config
        self.rank = rank
        self.page_size = config.page_size
        self.pacer = pacer
        self.observer = observer
        device = device or torch.device("cpu")
        self.device_pool = DeviceKVPool(config.kv, config.device_pages, config.page_size, device)
        self.host_pool = HostKVPool(config.kv, config.host_pages, config.page_size,
                                    pin=device.type == "cuda")
        self.tree = RadixTree(config.page_size)
        self.prefetch_threshold = config.prefetch_threshold  # unclamped, as SGLang's
        self.profile, dp_attention = effective_configuration(
            config.protocol, config.enable_dp_attention, config.variant)
        # SGLang's _generate_storage_config: attention-TP rank with DP attention, else global
        self.storage_tp_rank = storage_tp_rank(rank.tp_rank, rank.tp_size, rank.cp_rank,
                                               dp_attention)
        self.key_suffix = KeySuffix(
            tp_rank=self.storage_tp_rank, pp_rank=rank.pp_rank, pp_size=rank.pp_size,
            is_mla=config.kv.is_mla, prefix=config.key_prefix,
            cp_rank=rank.cp_rank if config.variant == "cp_rank_in_key" else None,
        )
        self.cache_controller = HiCacheController(
            self.device_pool, self.host_pool,
            ControllerConfig(
                page_size=config.page_size, write_policy=config.write_policy,
                prefetch_threshold=config.prefetch_threshold,
                prefetch_batch_pages=config.prefetch_batch_pages,
                prefetch_stop_policy=config.prefetch_stop_policy,
                prefetch_timeout_s=config.prefetch_timeout_s,
                variant=config.variant, agree_timeout_s=config.agree_timeout_s,
                profile=self.profile,
            ),
            collectives, groups, self.key_suffix, storage, pacer, observer,
            # MLA pools are replicated over TP: only TP rank 0 backs up
            backup_skip=config.kv.is_mla and self.storage_tp_rank != 0,
        )
        self.enable_storage = storage is not None
        self.ongoing_write_through: dict[int, TreeNode] = {}
        #: tokens each write-through covered when it was issued (its node may split meanwhile)
        self.write_through_len: dict[int, int] = {}
        self._write_backups = 0  # write_backup calls so far: what a "host_alloc" fault counts
        #: prefetches that reached their host allocation: what a "prefetch_alloc" fault counts
        self._prefetch_allocs = 0
        self.ongoing_load_back: dict[int, TreeNode] = {}
        self.ongoing_prefetch: dict[str, OngoingPrefetch] = {}
        self.ongoing_backup: dict[int, TreeNode] = {}
        self._backup_acks_taken = 0

    def _decide(self, kind: str, rid: str, local: tuple[int, ...], agreed: tuple[int, ...],
                outcome: str, effect: Effect | tuple[()] = ()) -> None:
        self.cache_controller.decide("scheduler", kind, rid, local, agreed, outcome, effect)
        self.observer.on_tree_changed("scheduler", self.tree.digest)

    # -- decision points --------------------------------------------------------------------
    def writing_check(self, write_back: bool = False,
                      ready: tuple[int, int] | None = None) -> None:
        """`ready`: (local, agreed) write acks, when the step agreed them in one MIN."""
        cc = self.cache_controller
        if write_back:  # write-back eviction blocks until every write finished: no collective
            self.pacer.need("write", cc.write_seq - 1)
            for ack in cc.ack_write_queue:
                if not ack.wait(self.cfg.agree_timeout_s):
                    raise HiCacheError(f"write ack {ack.seq} not finished in time")
            n = len(cc.ack_write_queue)
            effect = self._ack_writes(n)
            self._decide("writing_check", "", (n,), (n,), f"ack {n} writes (write-back)", effect)
            return
        if ready is None:
            seen = self.pacer.at("writing_check", "write", cc.write_seq)
            if not self.ongoing_write_through and self.profile.writing_check_early_return:
                return  # to 0.5.13: "the same on every rank" (unless host memory ran out)
            finish_count = _finished_prefix(cc.ack_write_queue, seen)
            if self.cfg.variant == "writing_check_local_skip" and finish_count == 0:
                return  # the bug: an early return on LOCAL state; the peers issue the MIN below
            (agreed,) = cc.ack_sync.reduce([finish_count], "min")
        else:  # agreed with the step's other counts (`_sync_hicache_ready_counts`)
            finish_count, agreed = ready
        effect = self._ack_writes(agreed)
        self._decide("writing_check", "", (finish_count,), (agreed,), f"ack {agreed} writes",
                     effect)

    def _ack_writes(self, n: int) -> AckEffect:
        """Pop n write acks; returns (popped, queued before) for the observer."""
        cc = self.cache_controller
        queued = len(cc.ack_write_queue)
        for _ in range(n):
            ack = cc.ack_write_queue.pop(0)
            self._synchronize(ack, "write")
            for node_id in ack.node_ids:
                node = self.ongoing_write_through.pop(node_id)
                backup_len = self.write_through_len.pop(node_id)
                self.tree.dec_lock_ref(node)
                if self.enable_storage:
                    self.write_backup_storage(node, backup_len)
        return AckEffect(queued - len(cc.ack_write_queue), queued)

    def _synchronize(self, ack, stream: str) -> None:  # noqa: ANN001
        """SGLang's `finish_event.synchronize()` after popping an agreed ack: the agreed count
        can exceed this rank's own finished count (0.5.13 forwards PP rank 0's), so a rank
        blocks on its own copy before acting on it."""
        if not ack.finished():
            self.pacer.need(stream, ack.seq)
            if not ack.wait(self.cfg.agree_timeout_s):
                raise HiCacheError(f"{stream} ack {ack.seq} not finished in time")

    def loading_check(self, ready: tuple[int, int] | None = None) -> None:
        """`ready`: (local, agreed) load acks, when the step agreed them in one MIN."""
        cc = self.cache_controller
        if ready is not None:  # agreed with the step's other counts
            finish_count, agreed = ready
        else:
            seen = self.pacer.at("loading_check", "load", cc.load_seq)
            finish_count = _finished_prefix(cc.ack_load_queue, seen)
            if self.profile.loading_check_agrees:
                (agreed,) = cc.ack_sync.reduce([finish_count], "min")
            else:  # before 0.5.13: no collective ("batch forwarding is synced")
                agreed = finish_count
        queued = len(cc.ack_load_queue)
        for _ in range(agreed):
            ack = cc.ack_load_queue.pop(0)
            self._synchronize(ack, "load")
            for node_id in ack.node_ids:
                self.tree.dec_lock_ref(self.ongoing_load_back.pop(node_id))
        self._decide("loading_check", "", (finish_count,), (agreed,), f"ack {agreed} loads",
                     AckEffect(queued - len(cc.ack_load_queue), queued))

    def _drain_queue_sizes(self) -> tuple[int, int, int]:
        """This rank's drainable revoke / backup-ack / host-release items (backup acks as far
        as the pacer's snapshot saw the backup thread)."""
        cc = self.cache_controller
        seen = self.pacer.at("drain", "backup", cc.backup_seq)
        if self.pacer.drain and self.profile.prefetch_progress == "at_termination":
            # the end of the run: every prefetch IO gate opens too (an aborted op's batch
            # waits at its gate until then, or until a later progress check opens it)
            self.pacer.at("drain", "prefetch_io", cc.prefetch_batches_issued)
        backup_acks = min(cc.ack_backup_queue.qsize(), seen - self._backup_acks_taken)
        return (cc.prefetch_revoke_queue.qsize(), backup_acks, cc.host_mem_releases())

    def drain_storage_control_queues(
            self, ready: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> None:
        """`ready`: (local, agreed) queue sizes, when the step agreed them in one MIN."""
        cc = self.cache_controller
        if ready is None:
            local = self._drain_queue_sizes()
            agreed = cc.control_sync.reduce(local, "min")
        else:
            local, agreed = ready
        popped = [0, 0, 0]
        for _ in range(agreed[0]):
            rid = self._take(cc.prefetch_revoke_queue, "revoke")
            popped[0] += 1
            info = self.ongoing_prefetch.pop(rid, None)
            if info is not None:  # its pages went back from the prefetch thread
                self._release_prefetch(info, keep_tokens=0)
        for _ in range(agreed[1]):
            op = self._take(cc.ack_backup_queue, "backup ack", "backup", self._backup_acks_taken)
            self._backup_acks_taken += 1
            popped[1] += 1
            node = self.ongoing_backup.pop(op.seq)
            node.backuped_storage = True
            self.tree.dec_host_ref(node)
        for _ in range(agreed[2]):
            self.host_pool.allocator.free(self._take(cc.host_mem_release_queue, "host release"))
            popped[2] += 1
        self._decide("drain", "", local, agreed,
                     f"revoke {agreed[0]}, backup acks {agreed[1]}, release {agreed[2]}",
                     DrainEffect(*popped))

    def _take(self, q: queue.Queue, what: str, stream: str = "", seq: int = 0):  # noqa: ANN202
        """One queued item; blocks, as SGLang's `get()` does, when the agreed count is above
        this rank's (PP rank 0 decided it), but never forever."""
        if q.empty() and stream:
            self.pacer.need(stream, seq)
        try:
            return q.get(timeout=self.cfg.agree_timeout_s)
        except queue.Empty:
            raise HiCacheError(f"agreed to drain a {what} this rank never queued "
                               f"(waited {self.cfg.agree_timeout_s:.0f} s)") from None

    def check_hicache_events(self) -> None:
        self.cache_controller.check_threads()
        # writing_check_local_skip lives in a per-check MIN (0.5.14 .. 0.5.16, or PP > 1)
        if (self.profile.ready_counts_one_min and self.rank.pp_size == 1
                and self.cfg.variant != "writing_check_local_skip"):
            self._check_ready_counts_one_min()
            return
        self.writing_check()
        self.loading_check()
        if self.enable_storage:
            self.drain_storage_control_queues()

    def _check_ready_counts_one_min(self) -> None:
        """0.5.17+ with PP 1 (`_sync_hicache_ready_counts`): the write / load ack counts and
        the drain's queue sizes are read first and agreed in one MIN, then each acts on its
        part; a backup that this step's write acks start is acked at a later drain."""
        cc = self.cache_controller
        write_seen = self.pacer.at("writing_check", "write", cc.write_seq)
        load_seen = self.pacer.at("loading_check", "load", cc.load_seq)
        queues = self._drain_queue_sizes() if self.enable_storage else ()
        local = (_finished_prefix(cc.ack_write_queue, write_seen),
                 _finished_prefix(cc.ack_load_queue, load_seen), *queues)
        agreed = cc.control_sync.reduce(local, "min")
        self.writing_check(ready=(local[0], agreed[0]))
        self.loading_check(ready=(local[1], agreed[1]))
        if self.enable_storage:
            self.drain_storage_control_queues(ready=(local[2:], agreed[2:]))

    def can_terminate_prefetch(self, op: PrefetchOperation) -> bool:
        policy = self.cfg.prefetch_stop_policy
        done = self.pacer.at("prefetch_progress", "prefetch_io",
                             op.first_batch + op.num_batches)
        # read no batch past the pacer's snapshot (free-running: all of them, i.e. now)
        op.batches_seen = min(max(done - op.first_batch, 0), op.num_batches)
        completed, terminated = op.progress_at(op.batches_seen)
        all_seen = op.io_done and op.batches_seen == op.num_batches
        queried = op.query_done.is_set()
        io_done = queried and (op.revoked or all_seen or
                               completed == op.storage_hit_count * self.page_size)
        # what this rank's IO had done when it decided: for an oracle, whatever the policy
        seen = ProgressSeen(int(queried), int(op.revoked), int(all_seen), completed,
                            op.storage_hit_count * self.page_size,
                            self.pacer.now() - op.start_time)
        if policy == "best_effort":  # every rank may stop: no collective
            self._decide("can_terminate", op.request_id, (0, 0), (0, 0), "terminate", seen)
            return True
        if policy == "wait_complete":
            can = io_done
        else:
            can = io_done or seen.elapsed > self.cfg.prefetch_timeout_s
        local = (1 - int(can), int(terminated))
        agreed = self.cache_controller.control_sync.reduce(local, "max")
        decision = agreed[0] == 0 or agreed[1] == 1
        self._decide("can_terminate", op.request_id, local, agreed,
                     "terminate" if decision else "wait", seen)
        return decision

    def check_prefetch_progress(self, rid: str) -> bool:
        """True once rid's prefetch is over and its agreed pages are in the tree."""
        info = self.ongoing_prefetch.get(rid)
        if info is None:
            return True
        op = info.operation
        if not self.can_terminate_prefetch(op):
            return False
        completed = self._terminate_prefetch(op, batches_seen=op.batches_seen)
        self.ongoing_prefetch.pop(rid)
        self._release_prefetch(info, keep_tokens=completed)
        return True

    def _terminate_prefetch(self, op: PrefetchOperation, agree: bool = True,
                            batches_seen: int | None = None) -> int:
        """Stop the IO and return the agreed number of tokens that landed on every rank
        (`agree=False`: this rank's own frozen count, as an abort takes it). Right after a
        progress check, `batches_seen` is what it saw: the count freezes no later than that."""
        frozen = min(op.mark_terminate(), op.progress_at(batches_seen)[0])
        self.pacer.need("prefetch_query", op.seq)
        timeout = self.cfg.agree_timeout_s
        if not op.query_done.wait(timeout):
            raise AgreementTimeout(f"prefetch {op.request_id}: hit query did not finish in "
                                   f"{timeout} s")
        if op.revoked:
            return 0
        if self.profile.prefetch_progress == "at_termination":
            # the IO thread never reduces: one MIN of the count frozen when the op terminated
            if agree:
                (agreed,) = self.cache_controller.control_sync.reduce([frozen], "min")
            else:
                agreed = frozen
            if not agree:
                # an abort does not wait for the IO: SGLang's IO thread still reads the op's
                # batch and gives its unfilled pages back (`prefetch_io_aux_func`) when its
                # gate opens, at a later progress check or the end of the run
                return agreed
            if op.num_batches:  # let the IO thread pass the op's remaining (skipped) batches
                self.pacer.need("prefetch_io", op.first_batch + op.num_batches - 1)
            self._decide("prefetch_done", op.request_id, (frozen,), (agreed,),
                         f"insert {agreed} tokens")
            return frozen if self.cfg.variant == "insert_local_completed" else agreed
        if op.num_batches:
            self.pacer.need("prefetch_io", op.first_batch + op.num_batches - 1)
        if not op.final_agreed.wait(timeout):
            raise AgreementTimeout(
                f"prefetch {op.request_id}: final progress ack not agreed in {timeout} s "
                "(a peer emitted a different number of acks?)"
            )
        completed = op.agreed_tokens
        if self.cfg.variant == "insert_local_completed":
            completed = op.completed_tokens
        self._decide("prefetch_done", op.request_id, (op.completed_tokens,), (op.agreed_tokens,),
                     f"insert {op.agreed_tokens} tokens")
        return completed

    def _release_prefetch(self, info: OngoingPrefetch, keep_tokens: int) -> None:
        """Insert the first `keep_tokens` fetched tokens and give back this side's share of the
        op's host pages, as SGLang splits them: the prefetch thread returned the pages past the
        hit (all of them on a revoke), the IO thread those past what it filled; here, the pages
        already in the tree are freed at once and those filled past the agreed count queued."""
        host = info.host_indices
        op = info.operation
        cc = self.cache_controller
        cc.prefetch_tokens_occupied = max(0, cc.prefetch_tokens_occupied - len(info.token_ids))
        self.observer.on_effect("prefetch_insert", op.request_id, (keep_tokens,))
        if keep_tokens:
            node, dups = self.tree.insert(
                info.token_ids[:keep_tokens], host_indices=host[:keep_tokens],
                from_node=info.last_host_node,
            )
            for n in self._path(node, info.last_host_node):
                n.backuped_storage = True
            for d in dups:
                self.host_pool.allocator.free(d)
        if not op.revoked:
            self.cache_controller.append_host_mem_release(host[keep_tokens : op.completed_tokens])
        self.tree.dec_host_ref(info.last_host_node)

    def _path(self, node: TreeNode, stop: TreeNode) -> list[TreeNode]:
        out = []
        while node is not stop and node is not self.tree.root:
            out.append(node)
            node = node.parent  # type: ignore[assignment]
        return out

    # -- request-level operations (called by the scheduler) ---------------------------------
    def match_prefix(self, tokens: list[int]) -> MatchResult:
        return self.tree.match_prefix(tokens)

    def init_load_back(self, last_host_node: TreeNode, host_hit_length: int):
        """Load host-only nodes on the path to last_host_node back to the device."""
        if host_hit_length == 0:
            return None
        nodes = []
        node = last_host_node
        while node.evicted:
            nodes.append(node)
            node = node.parent  # type: ignore[assignment]
        nodes.reverse()
        host_indices = torch.cat([n.host_value for n in nodes])  # type: ignore[misc]
        # protect what we load from host eviction (write-back eviction writes to host, which may
        # evict host copies) and the device-resident ancestor from device eviction
        self.tree.inc_host_ref(last_host_node)
        self.tree.inc_lock_ref(node)
        loaded = self.cache_controller.load(host_indices, last_host_node.id)
        if loaded is None:
            self.evict(host_indices.numel())
            loaded = self.cache_controller.load(host_indices, last_host_node.id)
        self.tree.dec_lock_ref(node)
        self.tree.dec_host_ref(last_host_node)
        if loaded is None:
            return None
        device_indices, ack = loaded
        pos = 0
        for n in nodes:
            n.value = device_indices[pos : pos + len(n.key)]
            pos += len(n.key)
        self.tree.inc_lock_ref(last_host_node)
        self.ongoing_load_back[last_host_node.id] = last_host_node
        return ack

    def prefetch_from_storage(self, rid: str, last_host_node: TreeNode, new_input_tokens: list[int]) -> bool:
        n = len(new_input_tokens) // self.page_size * self.page_size
        # SGLang gates here on HiRadixCache's own threshold, as configured (not clamped to a
        # page as the controller's revoke check is): a 0-token prefetch starts at threshold 0
        if (not self.enable_storage or n < self.prefetch_threshold
                or self.cache_controller.prefetch_rate_limited()):
            return False
        # protect the node the fetched pages will hang from before evicting host memory
        self.tree.inc_host_ref(last_host_node)
        # a host pool under pressure on this rank only: both attempts find no memory
        refused = self.pacer.fail("prefetch_alloc", self._prefetch_allocs)
        self._prefetch_allocs += 1
        host_indices = None if refused else self.host_pool.allocator.alloc(n)
        if host_indices is None:
            self.evict_host(n)
            host_indices = None if refused else self.host_pool.allocator.alloc(n)
            if host_indices is None:
                self.tree.dec_host_ref(last_host_node)
                return False
        last_hash = last_host_node.hash_value[-1] if last_host_node.hash_value else None
        op = self.cache_controller.prefetch(rid, host_indices, new_input_tokens[:n], last_hash)
        self.ongoing_prefetch[rid] = OngoingPrefetch(last_host_node, new_input_tokens[:n],
                                                     host_indices, op)
        self.cache_controller.prefetch_tokens_occupied += n
        self.pacer.need("prefetch_query", op.seq)
        return True

    def release_aborted_request(self, rid: str) -> None:
        info = self.ongoing_prefetch.pop(rid, None)
        if info is None:
            return
        self._terminate_prefetch(info.operation,
                                 agree=self.profile.prefetch_progress == "per_batch_acks")
        self.cache_controller.control_sync.barrier()  # no rank frees before every rank stopped
        self._release_prefetch(info, keep_tokens=0)

    def insert(self, tokens: list[int], device_indices: torch.Tensor) -> TreeNode:
        """Cache a finished request's page-aligned prefix; write it through to host as
        SGLang's `insert` does: a hit on every node of the path (`_inc_hit_count`), and a node
        hit `write_through_threshold` times (1 under write_through) is written."""
        hits: list[TreeNode] = []
        node, dups = self.tree.insert(tokens, device_indices=device_indices, hits=hits)
        for d in dups:
            self.device_pool.allocator.free(d)
        if self.cfg.write_policy != "write_back":
            threshold = (1 if self.cfg.write_policy == "write_through"
                         else self.cfg.write_through_threshold)
            for n in hits:
                n.hit_count += 1
                if not n.backuped and n.hit_count >= threshold:
                    self.write_backup(n)
        return node

    def write_backup(self, node: TreeNode, write_back: bool = False) -> bool:
        assert node.value is not None
        # a host pool under pressure on this rank only: both attempts find no memory
        refused = self.pacer.fail("host_alloc", self._write_backups)
        self._write_backups += 1
        # SGLang keeps backed-up nodes a contiguous prefix from the root: a node whose parent
        # is not on host is not written through (write-back writes whatever it evicts)
        parent = node.parent
        if not write_back and parent is not self.tree.root and not parent.backuped:
            return False
        host_indices = None if refused else self.cache_controller.write(node.value, node.id)
        if host_indices is None:
            self.evict_host(node.value.numel())
            host_indices = None if refused else self.cache_controller.write(node.value, node.id)
        if host_indices is None:
            return False
        node.host_value = host_indices
        self.ongoing_write_through[node.id] = node
        self.write_through_len[node.id] = len(node.key)
        self.tree.inc_lock_ref(node)
        return True

    def write_backup_storage(self, node: TreeNode, backup_len: int | None = None) -> None:
        """Back `node` up to storage; with the profile's `backup_split_chain`, every page its
        write-through covered (`backup_len` tokens): the node and the upper parts a split cut
        off it since (SGLang's `_concat_split_chain`)."""
        chain = [node]
        if self.profile.backup_split_chain and backup_len is not None:
            covered = len(node.key)
            while covered < backup_len and chain[-1].parent is not self.tree.root:
                chain.append(chain[-1].parent)  # type: ignore[arg-type]
                covered += len(chain[-1].key)
            chain.reverse()
        assert all(n.host_value is not None for n in chain)
        seq = self.cache_controller.write_storage(
            torch.cat([n.host_value for n in chain]),  # type: ignore[misc]
            [t for n in chain for t in n.key], [h for n in chain for h in n.hash_value], node.id)
        self.ongoing_backup[seq] = node
        self.tree.inc_host_ref(node)

    def evict(self, num_tokens: int) -> int:
        if self.cfg.write_policy == "write_back":
            for n in list(self.tree.nodes()):
                if (not n.evicted and not n.backuped and n.lock_ref == 0
                        and n.id not in self.ongoing_write_through):
                    self.write_backup(n, write_back=True)
            # once, whatever was written, as SGLang's `evict` does under write_back (it blocks
            # until every write finished)
            self.writing_check(write_back=True)
        return self.tree.evict_device(num_tokens, self.device_pool.allocator.free)

    def evict_host(self, num_tokens: int) -> int:
        return self.tree.evict_host(num_tokens, self.host_pool.allocator.free)

    # -- inspection -------------------------------------------------------------------------
    def in_flight(self) -> dict[str, int]:
        cc = self.cache_controller
        return {
            "write_acks": len(cc.ack_write_queue), "load_acks": len(cc.ack_load_queue),
            "prefetches": len(self.ongoing_prefetch), "backups": len(self.ongoing_backup),
        }

    def shutdown(self) -> None:
        self.cache_controller.shutdown()
