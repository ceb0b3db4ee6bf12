"""The sync groups and the one reduce every cross-rank decision goes through.

Which groups depends on the release (reference/profiles.py): before SGLang PR #20460 the
cache's TP group alone; after it the attention-CP and attention-TP groups (the TP group when
neither exists), and later PP; single-rank groups are skipped and duplicates (same rank set)
dropped. Each is its own gloo group so background threads can
reduce on it off the NCCL streams. A value reduced over the CP group and then over the TP group
is the MIN/MAX over the whole CP x TP grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch

from reference.profiles import DEFAULT_PROFILE, ProtocolProfile, get_profile

RankSet = tuple[int, ...]


class Collectives(Protocol):
    """What the cache needs from a communication library (torch.distributed in production)."""

    rank: int

    def new_groups(self, rank_sets: Sequence[RankSet], tag: str) -> list[Any]:
        """Collective over the world: every rank passes its own sets, gets handles to them."""
        ...

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None: ...

    def forward(self, tensor: torch.Tensor, src: int, group: Any) -> None:
        """`src` sends `tensor` to every other member (send/recv); the others receive into it."""
        ...


@dataclass(frozen=True)
class ParallelGroups:
    """Rank sets of the groups this rank belongs to, as the scheduler hands them to the cache.

    `tp` is `tp_cache_group`: the attention-TP group with DP attention, else the full TP group
    of the stage (which holds the CP peers). `attn_tp` / `attn_cp` are None where the model has
    no attention split.
    """

    tp: RankSet
    attn_tp: RankSet | None = None
    attn_cp: RankSet | None = None
    pp: RankSet | None = None


@dataclass(frozen=True)
class SyncPlan:
    """Where one agreement goes: all-reduces in order, then PP rank 0 forwards (0.5.13 acks)."""

    all_reduce: list[RankSet]
    pp_forward: RankSet | None = None


def _dedup(base: Sequence[RankSet | None]) -> list[RankSet]:
    seen: set[RankSet] = set()
    out: list[RankSet] = []
    for ranks in base:
        if ranks is None or len(ranks) <= 1:
            continue
        key = tuple(sorted(ranks))
        if key in seen:
            continue
        seen.add(key)
        out.append(key)
    return out


def sync_plan(groups: ParallelGroups, profile: ProtocolProfile | str = DEFAULT_PROFILE,
              acks: bool = False) -> SyncPlan:
    """The groups an agreement reduces over (SGLang's `_create_sync_groups`, per release).

    `acks`: the plan of the write / load ack agreements (`writing_check`, `loading_check`),
    the only ones 0.5.13 forwards from PP rank 0; for every other profile the same plan.
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    if profile.sync_groups == "tp_cache_group":
        base: list[RankSet | None] = [groups.tp]
    elif groups.attn_cp is not None or groups.attn_tp is not None:
        base = [groups.attn_cp, groups.attn_tp]
    else:
        base = [groups.tp]
    pp = groups.pp if groups.pp is not None and len(groups.pp) > 1 else None
    if profile.pp_agreement == "in_groups":
        base.append(pp)
    forwards = acks and profile.pp_agreement == "pp0_forwards_acks"
    forward = tuple(sorted(pp)) if pp is not None and forwards else None
    return SyncPlan(_dedup(base), forward)


def sync_rank_sets(groups: ParallelGroups, profile: ProtocolProfile | str = DEFAULT_PROFILE
                   ) -> list[RankSet]:
    """The rank sets all-reduced over, in order."""
    return sync_plan(groups, profile).all_reduce


class SyncGroup:
    """One purpose's set of gloo groups (hits, completion, control), reduced in order."""

    def __init__(self, collectives: Collectives, plan: SyncPlan | list[RankSet], tag: str) -> None:
        if not isinstance(plan, SyncPlan):
            plan = SyncPlan(list(plan))
        self.tag = tag
        self.plan = plan
        self.rank_sets = plan.all_reduce
        self._collectives = collectives
        self._groups = collectives.new_groups(plan.all_reduce, tag) if plan.all_reduce else []
        self._forward = (collectives.new_groups([plan.pp_forward], f"{tag}_pp")[0]
                         if plan.pp_forward else None)

    @property
    def issues_collectives(self) -> bool:
        return bool(self._groups) or self._forward is not None

    def reduce(self, values: Sequence[int], op: str = "min") -> tuple[int, ...]:
        if not self._groups and self._forward is None:
            # every group was single-rank: nothing to reduce; a tensor round trip costs 3 us
            # warm, ~20 us on a busy box, per agreement (hits, each progress ack, final ack)
            return tuple(int(v) for v in values)
        t = torch.tensor(list(values), dtype=torch.int64)
        for g in self._groups:
            self._collectives.all_reduce(t, op, g)
        if self._forward is not None:
            assert self.plan.pp_forward is not None
            self._collectives.forward(t, self.plan.pp_forward[0], self._forward)
        return tuple(int(v) for v in t.tolist())

    def barrier(self) -> None:
        """`torch.distributed.barrier` over the groups (a one-element MAX, as gloo does it)."""
        self.reduce([0], "max")


class TorchCollectives:
    """torch.distributed with gloo sub-groups, created once per rank set and tag.

    `dist.new_group` must be called by every rank, members or not, in the same order, so each
    request is first all-gathered over the world (as SGLang's create_custom_parallel_group).
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.timeout = timedelta(seconds=timeout_s)
        self._cache: dict[tuple[RankSet, str], Any] = {}

    def new_groups(self, rank_sets: Sequence[RankSet], tag: str) -> list[Any]:
        dist = self._dist
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [tuple(r) for r in rank_sets])
        wanted = sorted({tuple(r) for per_rank in gathered for r in per_rank})
        for ranks in wanted:
            if (ranks, tag) not in self._cache:
                self._cache[(ranks, tag)] = dist.new_group(
                    list(ranks), backend="gloo", timeout=self.timeout
                )
        return [self._cache[(tuple(r), tag)] for r in rank_sets]

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        red = self._dist.ReduceOp.MIN if op == "min" else self._dist.ReduceOp.MAX
        self._dist.all_reduce(tensor, op=red, group=group)

    def forward(self, tensor: torch.Tensor, src: int, group: Any) -> None:
        if self.rank == src:
            for dst in self._dist.get_process_group_ranks(group):
                if dst != src:
                    self._dist.send(tensor, dst=dst, group=group)
        else:
            self._dist.recv(tensor, src=src, group=group)
