"""Protocol profiles: how each SGLang release's HiCache agrees across ranks, in one place.

Each profile is named after the release whose semantics it models (read from the released
wheels; facts in docs/design/protocol-by-release.md). Every release shares the shape of the decision
points (best_effort `can_terminate_prefetch` returns with no collective,
`release_aborted_request` barriers, the scheduler skips a request whose prefetch cannot
terminate yet); a profile lists only what differs. The cache reads `self.profile.<field>` at
the one place each behaviour lives.

    field                     0.5.10          0.5.11 (#20460)  0.5.13            0.5.14            0.5.20
    sync_groups               tp_cache_group  attn_cp, attn_tp attn_cp, attn_tp  attn_cp, attn_tp  attn_cp, attn_tp
    loading_check_agrees      no              no               MIN               MIN               MIN
    writing_check_early_return yes            yes              yes               no                no
    prefetch_progress         at_termination  at_termination   at_termination    at_termination    per_batch_acks
    pp_agreement              none            none             pp0_forwards_acks pp0_forwards_acks in_groups
    prefetch_capacity         0.8(host-dev)   0.8(host-dev)    0.8(host-dev)     0.8(host-dev)     0.5 host
    backup_split_chain        no              no               yes               yes               yes
    revoke_threshold          controller      controller       controller        controller        cache
    ready_counts_one_min      no              no               no                no                yes (PP 1)
    unfetched_pages           release queue   release queue    release queue     release queue     never taken

0.5.14 differs from 0.5.13.post1 only in `writing_check` (the diff of the two wheels'
hiradix_cache.py and cache_controller.py, protocol paths only); 0.5.15 keeps it. 0.5.16 .. 0.5.18
add the hit-queue pipeline (host pages allocated at the drain), which no profile models: they
are judged with this one.

writing_check_early_return: up to 0.5.13.post1 `writing_check` returns before its collective
when nothing is in flight ("all ranks has the same ongoing_write_through"); from 0.5.14 every
rank reduces every step, because a `write_backup` that finds no host memory on a subset of
ranks makes that set differ (SGLang's own comment; the Schedule fault "host_alloc").

pp0_forwards_acks (0.5.13): only `writing_check` and `loading_check` call `_all_reduce`, which
reduces over the attention groups on PP rank 0 alone and sends the value down the pipeline
(`_pp_sync`, recv / isend); the drain, the storage hit count, `can_terminate_prefetch`,
`check_prefetch_progress` and the abort barrier call `_all_reduce_attn_groups`: no PP
agreement, each stage agrees on its own as in 0.5.11. We model the forward as every stage
reducing over its own attention groups, then PP rank 0's value overwriting the others': the
same agreed values, one extra (discarded) reduce per later stage in the collective log.

in_groups (0.5.20) approximates two mechanisms of the wheel with one. The
scheduler's `writing_check` / `loading_check` / drain / `can_terminate_prefetch` still call
`_all_reduce` (PP rank 0 reduces, `_pp_sync` forwards); the controller's prefetch hit and
completion groups (`_create_sync_groups`) contain the PP group, a real all-reduce. Modelling
the scheduler's forward as a PP all-reduce changes the value only where PP rank 0's reduction
differs from the reduction over all stages. Write / load acks: MIN over all stages pops no more
than PP rank 0's count, and the wheel's later stages `finish_event.synchronize()` on their own
copy before acting, so both end with the same acks popped, at most a round apart. The drain
and `can_terminate` can differ in value (the wheel pops PP rank 0's queue counts, a later stage
blocking on its own queue; it terminates when stage 0 can, where the model waits for the
slowest stage). In both every stage acts on one value, so cross-stage agreement holds in both;
the table's "agree" for 0.5.20 under PP is about that agreement, not about the exact value.

backup_split_chain: a node split while its write-through was in flight keeps the write's ack;
from 0.5.13 the storage backup that follows the ack writes every page the write covered
(`_replace_pending_write_through_node`, `write_backup_storage(node, backup_len)` walking
`_concat_split_chain`); before, only the pages the acked node kept after the split.
revoke_threshold: to 0.5.17 the controller's prefetch thread revokes below its own threshold,
clamped to one page (`max(prefetch_threshold, page_size)`); from 0.5.18 the drain
(`_drain_and_alloc_storage_hit`) revokes below the cache's `self.prefetch_threshold`, as
configured: at threshold 0 a prefetch with no hits is fetched as 0 pages and inserted with 0
tokens.

ready_counts_one_min: from 0.5.17, with PP 1, `check_hicache_events` reads the write / load ack
counts and the drain's queue sizes together (`_sync_hicache_ready_counts`, one MIN) before
`writing_check` acts, so a storage backup that this step's write acks start is acked one
drain later than when the drain read its queues after `writing_check`.

unfetched_pages: from 0.5.16 a prefetch's host pages are allocated at the drain for the agreed
hit only; the pages the reference takes up front past the hit (all of them on a revoke) never
existed there, so they go straight back to the pool instead of through the drain's
host-release queue (`release c` counts only what SGLang queues). The allocation itself still
happens in `prefetch_from_storage` (its timing under host-pool pressure is not modelled).

`tp_cache_group` is what the scheduler hands the cache: the attention-TP group with
`--enable-dp-attention`, else the full TP group of the stage (which holds the CP peers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SyncGroups = Literal["tp_cache_group", "attn_cp_then_attn_tp"]
PrefetchProgress = Literal["at_termination", "per_batch_acks"]
PrefetchCapacity = Literal["host_minus_device", "half_host"]
PPAgreement = Literal["none", "pp0_forwards_acks", "in_groups"]
RevokeThreshold = Literal["controller", "cache"]
UnfetchedPages = Literal["release_queue", "never_taken"]


@dataclass(frozen=True)
class ProtocolProfile:
    name: str
    #: which groups every agreement reduces over (single-rank groups skipped, duplicates dropped)
    sync_groups: SyncGroups
    #: `loading_check` agrees (MIN) on the finished load acks; else each rank pops its own
    loading_check_agrees: bool
    #: `writing_check` returns before its collective when nothing is in flight (to 0.5.13)
    writing_check_early_return: bool
    #: at_termination: the IO thread only counts pages; `check_prefetch_progress` freezes the
    #: local count and agrees once (MIN). per_batch_acks: the IO thread sends one progress ack
    #: per batch and the prefetch-sync thread agrees (MIN) on each one.
    prefetch_progress: PrefetchProgress
    #: none: each pipeline stage agrees on its own. pp0_forwards_acks: for the write / load ack
    #: agreements only, PP rank 0's agreed value is sent to the other stages (send/recv); every
    #: other agreement is per stage. in_groups: the PP group is one more all-reduce, everywhere.
    pp_agreement: PPAgreement
    summary: str = ""
    #: how many tokens storage prefetches may hold before new ones are refused
    #: (`prefetch_rate_limited`): host_minus_device = 0.8 x (host - device pool tokens), to
    #: 0.5.18; half_host = 0.5 x the host pool (0.5.19+)
    prefetch_capacity: PrefetchCapacity = "host_minus_device"
    #: the storage backup after a write-through ack covers the pages written, across a split
    #: of the node since (0.5.13+); else only the acked node's own pages
    backup_split_chain: bool = True
    #: controller: revoke when the agreed hit is below the controller's threshold, clamped to
    #: one page (to 0.5.17); cache: below the cache's threshold as configured (0.5.18+)
    revoke_threshold: RevokeThreshold = "controller"
    #: with PP 1, one MIN of [write acks, load acks, drain queue sizes] read before
    #: `writing_check` acts (0.5.17+ `_sync_hicache_ready_counts`)
    ready_counts_one_min: bool = False
    #: release_queue: a prefetch's pages past its agreed hit go back through the drain's
    #: host-release queue; never_taken: straight to the pool (0.5.16+ allocate only the hit)
    unfetched_pages: UnfetchedPages = "release_queue"


PROFILES: dict[str, ProtocolProfile] = {p.name: p for p in (
    ProtocolProfile(
        "sglang-0.5.10", sync_groups="tp_cache_group", loading_check_agrees=False,
        writing_check_early_return=True, prefetch_progress="at_termination", pp_agreement="none",
        backup_split_chain=False,
        summary="before PR #20460: every agreement over the cache's TP group only",
    ),
    ProtocolProfile(
        "sglang-0.5.11", sync_groups="attn_cp_then_attn_tp", loading_check_agrees=False,
        writing_check_early_return=True, prefetch_progress="at_termination", pp_agreement="none",
        backup_split_chain=False,
        summary="PR #20460: reduce over attn-CP then attn-TP; loading_check unsynchronised",
    ),
    ProtocolProfile(
        "sglang-0.5.13", sync_groups="attn_cp_then_attn_tp", loading_check_agrees=True,
        writing_check_early_return=True, prefetch_progress="at_termination", pp_agreement="pp0_forwards_acks",
        summary="+ loading_check MIN; PP rank 0 decides and forwards the write / load acks",
    ),
    ProtocolProfile(
        "sglang-0.5.14", sync_groups="attn_cp_then_attn_tp", loading_check_agrees=True,
        writing_check_early_return=False, prefetch_progress="at_termination",
        pp_agreement="pp0_forwards_acks",
        summary="+ writing_check always reduces (a host allocation refused on some ranks "
                "no longer skips the MIN there)",
    ),
    ProtocolProfile(
        "sglang-0.5.20", sync_groups="attn_cp_then_attn_tp", loading_check_agrees=True,
        writing_check_early_return=False, prefetch_progress="per_batch_acks", pp_agreement="in_groups",
        summary="+ per-batch prefetch progress acks via the prefetch-sync thread (0.5.19); PP "
                "in the groups",
        prefetch_capacity="half_host", revoke_threshold="cache", ready_counts_one_min=True,
        unfetched_pages="never_taken",
    ),
)}

#: what the newest release's server runs: 0.5.19 .. 0.5.23 build UnifiedRadixCache, whose
#: decision points are the same code in 0.5.20 and 0.5.23 (scenarios/core/releases.py)
DEFAULT_PROFILE = "sglang-0.5.20"
DP_ATTENTION_CHOICES = ("on", "off")


class UnknownProfileError(ValueError):
    pass


def get_profile(name: str) -> ProtocolProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown protocol '{name}': choose one of {', '.join(PROFILES)}"
        ) from None
