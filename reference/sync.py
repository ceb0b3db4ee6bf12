"""The sync groups and the one reduce every cross-rank decision goes through.

After SGLang PR #20460 the groups are built from the attention-CP and attention-TP groups (the
TP group when neither exists), plus PP when present; single-rank groups are skipped and
duplicates (same rank set) dropped. Each is its own gloo group so background threads can
reduce on it off the NCCL streams. A value reduced over the CP group and then over the TP group
is the MIN/MAX over the whole CP x TP grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch

RankSet = tuple[int, ...]


class Collectives(Protocol):
    """What the cache needs from a communication library (torch.distributed in production)."""

    rank: int

    def new_groups(self, rank_sets: Sequence[RankSet], tag: str) -> list[Any]:
        """Collective over the world: every rank passes its own sets, gets handles to them."""
        ...

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None: ...


@dataclass(frozen=True)
class ParallelGroups:
    """Rank sets of the groups this rank belongs to, as the scheduler hands them to the cache.

    `tp` is the group the cache was given as its TP group (the attention TP group under
    attention CP); `attn_tp` / `attn_cp` are None where the model has no attention split.
    """

    tp: RankSet
    attn_tp: RankSet | None = None
    attn_cp: RankSet | None = None
    pp: RankSet | None = None


def sync_rank_sets(groups: ParallelGroups, variant: str = "fixed") -> list[RankSet]:
    """The rank sets to reduce over, in order (SGLang's `_create_sync_groups`)."""
    if variant == "tp_only_sync":
        base: list[RankSet | None] = [groups.tp]
    elif groups.attn_cp is not None or groups.attn_tp is not None:
        base = [groups.attn_cp, groups.attn_tp]
    else:
        base = [groups.tp]
    if variant != "tp_only_sync":
        base.append(groups.pp)
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


class SyncGroup:
    """One purpose's set of gloo groups (hits, completion, control), reduced in order."""

    def __init__(self, collectives: Collectives, rank_sets: list[RankSet], tag: str) -> None:
        self.tag = tag
        self.rank_sets = rank_sets
        self._collectives = collectives
        self._groups = collectives.new_groups(rank_sets, tag) if rank_sets else []

    def reduce(self, values: Sequence[int], op: str = "min") -> tuple[int, ...]:
        t = torch.tensor(list(values), dtype=torch.int64)
        for g in self._groups:
            self._collectives.all_reduce(t, op, g)
        return tuple(int(v) for v in t.tolist())


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
