"""The sync groups per release, without a cache or a world: `sync_plan` on pipeline layouts and
on layouts whose groups are single-rank or repeat, `SyncGroup` over a recording fake of the
collectives, and `TorchCollectives` over a fake `torch.distributed`.

Fast on purpose (well under a second of tests): the mutation run's kill command runs this file
on every mutant of reference/sync.py (scenarios/campaigns/mutation.py, detector "sync"); the
generated runs build no PP forward and no group that dedups, so these paths are pinned here.
What each release does: reference/profiles.py's table (sync groups, PP agreement).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from reference.profiles import PROFILES
from reference.sync import ParallelGroups, RankSet, SyncGroup, SyncPlan, TorchCollectives, sync_plan

#: a rank with attention TP (0, 1), CP peer 2 and a second pipeline stage at rank 4
PP_GRID = ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0, 2), pp=(0, 4))
BEFORE_PP = ("sglang-0.5.10", "sglang-0.5.11")


@pytest.mark.parametrize("protocol", sorted(PROFILES))
def test_a_single_stage_pipeline_adds_no_group_and_no_forward(protocol: str) -> None:
    """pp=(rank,) is a pipeline of one stage: nothing to agree with, for acks or otherwise."""
    one_stage = ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0, 2), pp=(0,))
    no_pp = ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0, 2))
    for acks in (False, True):
        assert sync_plan(one_stage, protocol, acks=acks) == sync_plan(no_pp, protocol, acks=acks)
        assert sync_plan(one_stage, protocol, acks=acks).pp_forward is None


@pytest.mark.parametrize("protocol", sorted(PROFILES))
def test_two_stages_per_release(protocol: str) -> None:
    """0.5.10 / 0.5.11: no PP agreement; 0.5.13 / 0.5.14: PP rank 0 forwards the ack agreements
    only (and the plan's default is not an ack agreement); 0.5.20: PP is one more all-reduce."""
    tp_first = [(0, 1)] if protocol == "sglang-0.5.10" else [(0, 2), (0, 1)]
    plain, acks = sync_plan(PP_GRID, protocol), sync_plan(PP_GRID, protocol, acks=True)
    if protocol in BEFORE_PP:
        assert plain == acks == SyncPlan(tp_first, None)
    elif PROFILES[protocol].pp_agreement == "pp0_forwards_acks":
        assert plain == SyncPlan(tp_first, None)
        assert acks == SyncPlan(tp_first, (0, 4))
    else:
        assert protocol == "sglang-0.5.20"
        assert plain == acks == SyncPlan([*tp_first, (0, 4)], None)


def test_pp_forward_is_sorted_so_pp_rank_0_comes_first() -> None:
    g = ParallelGroups(tp=(4, 5), attn_tp=(4, 5), attn_cp=(4, 6), pp=(4, 0))
    assert sync_plan(g, "sglang-0.5.13", acks=True).pp_forward == (0, 4)


@pytest.mark.parametrize("protocol", sorted(set(PROFILES) - {"sglang-0.5.10"}))
def test_single_rank_groups_are_skipped_and_later_groups_kept(protocol: str) -> None:
    """cp=1: the attention-CP group is the rank alone; the attention-TP group after it stays."""
    g = ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0,))
    assert sync_plan(g, protocol).all_reduce == [(0, 1)]
    alone = ParallelGroups(tp=(0,), attn_tp=(0,), attn_cp=(0,), pp=(0,))
    assert sync_plan(alone, protocol, acks=True) == SyncPlan([], None)


@pytest.mark.parametrize("protocol", sorted(set(PROFILES) - {"sglang-0.5.10"}))
def test_a_repeated_rank_set_is_reduced_over_once(protocol: str) -> None:
    """Groups are rank sets: the same set twice, in any order, is one reduce, not two."""
    g = ParallelGroups(tp=(0, 1), attn_tp=(1, 0), attn_cp=(0, 1))
    assert sync_plan(g, protocol).all_reduce == [(0, 1)]
    with_pp = ParallelGroups(tp=(0, 1), attn_tp=(0,), attn_cp=(0, 1), pp=(1, 0))
    assert sync_plan(with_pp, protocol).all_reduce == [(0, 1)]


def test_a_group_after_a_repeated_one_is_kept() -> None:
    """0.5.20 appends the PP group after the attention groups: a repeat before it drops only
    the repeat."""
    g = ParallelGroups(tp=(0, 1), attn_tp=(1, 0), attn_cp=(0, 1), pp=(0, 4))
    assert sync_plan(g, "sglang-0.5.20").all_reduce == [(0, 1), (0, 4)]


def test_without_attention_groups_the_tp_group_is_used() -> None:
    g = ParallelGroups(tp=(0, 1, 2, 3))
    for protocol in PROFILES:
        assert sync_plan(g, protocol).all_reduce == [(0, 1, 2, 3)]


@pytest.mark.parametrize("protocol", sorted(set(PROFILES) - {"sglang-0.5.10"}))
def test_one_attention_group_is_used_without_the_tp_group(protocol: str) -> None:
    """The TP group only when both attention groups are absent (SGLang's `[attn_cp, attn_tp]`,
    `[tp]` when neither exists)."""
    assert sync_plan(ParallelGroups(tp=(0, 1, 2, 3), attn_tp=(0, 1)), protocol).all_reduce \
        == [(0, 1)]
    assert sync_plan(ParallelGroups(tp=(0, 1, 2, 3), attn_cp=(0, 2)), protocol).all_reduce \
        == [(0, 2)]


# -- SyncGroup over a recording fake ---------------------------------------------------------
class FakeCollectives:
    """One rank of a world whose other members contribute `others` to every all-reduce and whose
    PP rank 0 holds `pp0_value`; records every call."""

    def __init__(self, rank: int, others: list[int], pp0_value: int | None = None) -> None:
        self.rank = rank
        self.others = others
        self.pp0_value = pp0_value
        self.calls: list[tuple] = []

    def new_groups(self, rank_sets: list[RankSet], tag: str) -> list[Any]:
        self.calls.append(("new_groups", [tuple(r) for r in rank_sets], tag))
        return [f"{tag}{list(r)}" for r in rank_sets]

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        self.calls.append(("all_reduce", op, group, tensor.tolist()))
        for v in self.others:
            other = torch.full_like(tensor, v)
            tensor.copy_(torch.minimum(tensor, other) if op == "min"
                         else torch.maximum(tensor, other))

    def forward(self, tensor: torch.Tensor, src: int, group: Any) -> None:
        self.calls.append(("forward", src, group))
        if self.rank != src:
            assert self.pp0_value is not None
            tensor.fill_(self.pp0_value)


def test_sync_group_reduces_in_order_then_pp_rank_0_forwards() -> None:
    """0.5.13 ack agreement on the second stage (rank 4): MIN over its own attention groups, then
    PP rank 0's value overwrites it; the forward group has its own tag and is made once."""
    plan = SyncPlan([(4, 6), (4, 5)], (0, 4))
    coll = FakeCollectives(rank=4, others=[3], pp0_value=7)
    sg = SyncGroup(coll, plan, "ack")
    assert coll.calls == [("new_groups", [(4, 6), (4, 5)], "ack"),
                          ("new_groups", [(0, 4)], "ack_pp")]
    assert sg.issues_collectives
    assert sg.reduce([5], "min") == (7,)
    assert coll.calls[2:] == [("all_reduce", "min", "ack[4, 6]", [5]),
                              ("all_reduce", "min", "ack[4, 5]", [3]),
                              ("forward", 0, "ack_pp[0, 4]")]


def test_on_pp_rank_0_the_forward_sends_its_own_agreed_value() -> None:
    coll = FakeCollectives(rank=0, others=[2, 9])
    sg = SyncGroup(coll, SyncPlan([(0, 2)], (0, 4)), "ack")
    assert sg.reduce([5, 1], "max") == (9, 9)
    assert coll.calls[-1] == ("forward", 0, "ack_pp[0, 4]")


def test_sync_group_without_groups_issues_nothing() -> None:
    coll = FakeCollectives(rank=0, others=[0])
    sg = SyncGroup(coll, [], "control")
    assert not sg.issues_collectives
    assert sg.reduce([3, 4]) == (3, 4)
    sg.barrier()
    assert coll.calls == []


@pytest.mark.parametrize("plan, issues", [
    (SyncPlan([(0, 1)], None), True),  # all-reduces only
    (SyncPlan([], (0, 4)), True),  # a forward only (0.5.13 acks, a stage without peers)
    (SyncPlan([(0, 1)], (0, 4)), True),
    (SyncPlan([], None), False),
])
def test_issues_collectives_says_whether_reduce_issues_any(plan: SyncPlan, issues: bool) -> None:
    coll = FakeCollectives(rank=0, others=[0], pp0_value=0)
    sg = SyncGroup(coll, plan, "control")
    assert sg.issues_collectives is issues
    made = len(coll.calls)
    sg.reduce([1])
    assert (len(coll.calls) > made) is issues


def test_barrier_is_one_max_over_every_group() -> None:
    coll = FakeCollectives(rank=0, others=[0])
    SyncGroup(coll, [(0, 1), (0, 2)], "control").barrier()
    assert [(c[0], c[1], c[2]) for c in coll.calls[1:]] == [
        ("all_reduce", "max", "control[0, 1]"), ("all_reduce", "max", "control[0, 2]")]


# -- TorchCollectives over a fake torch.distributed --------------------------------------------
class FakeDist:
    """Enough of torch.distributed for one rank of a 4-rank world; records calls."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, rank: int, peers_ask: list[list[RankSet]]) -> None:
        self.rank = rank
        self.peers_ask = peers_ask
        self.calls: list[tuple] = []

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return 4

    def all_gather_object(self, out: list, obj: Any) -> None:
        asked = [obj, *self.peers_ask]
        out[:] = asked + [[] for _ in range(4 - len(asked))]

    def new_group(self, ranks: list[int], backend: str, timeout: Any) -> Any:
        self.calls.append(("new_group", tuple(ranks), backend))
        return ("pg", tuple(ranks))

    def all_reduce(self, tensor: torch.Tensor, op: Any, group: Any) -> None:
        self.calls.append(("all_reduce", op, group))

    def get_process_group_ranks(self, group: Any) -> list[int]:
        return list(group[1])

    def send(self, tensor: torch.Tensor, dst: int, group: Any) -> None:
        self.calls.append(("send", dst))

    def recv(self, tensor: torch.Tensor, src: int, group: Any) -> None:
        self.calls.append(("recv", src))


def _torch_collectives(monkeypatch: pytest.MonkeyPatch, dist: FakeDist) -> TorchCollectives:
    for name in ("get_rank", "get_world_size", "all_gather_object", "new_group", "all_reduce",
                 "get_process_group_ranks", "send", "recv"):
        monkeypatch.setattr(torch.distributed, name, getattr(dist, name))
    return TorchCollectives(timeout_s=5.0)


def test_new_groups_are_made_once_for_every_set_any_rank_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank calls `new_group` for every set any rank wants, in one sorted order (members
    or not), once per set and tag; each rank gets handles to its own sets, in its order."""
    dist = FakeDist(rank=0, peers_ask=[[(1, 3)], [(0, 2)], []])
    coll = _torch_collectives(monkeypatch, dist)
    handles = coll.new_groups([(0, 2), (0, 1)], "hits")
    assert dist.calls == [("new_group", (0, 1), "gloo"), ("new_group", (0, 2), "gloo"),
                          ("new_group", (1, 3), "gloo")]
    assert handles == [("pg", (0, 2)), ("pg", (0, 1))]
    assert coll.new_groups([(0, 1)], "hits") == [("pg", (0, 1))]
    assert len(dist.calls) == 3  # cached
    coll.new_groups([(0, 1)], "control")  # another tag: its own group
    assert [c[1] for c in dist.calls[3:]] == [(0, 1), (0, 2), (1, 3)]


def test_all_reduce_maps_min_and_max(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = FakeDist(rank=0, peers_ask=[])
    coll = _torch_collectives(monkeypatch, dist)
    t = torch.zeros(1, dtype=torch.int64)
    coll.all_reduce(t, "min", "g")
    coll.all_reduce(t, "max", "g")
    assert [c[1] for c in dist.calls] == [torch.distributed.ReduceOp.MIN,
                                          torch.distributed.ReduceOp.MAX]


@pytest.mark.parametrize("rank, expect", [
    (2, [("send", 0), ("send", 5)]),  # the source sends to every other member
    (0, [("recv", 2)]), (5, [("recv", 2)]),  # the others receive from it
])
def test_forward_sends_from_src_to_every_other_member(
        monkeypatch: pytest.MonkeyPatch, rank: int, expect: list[tuple]) -> None:
    dist = FakeDist(rank=rank, peers_ask=[])
    coll = _torch_collectives(monkeypatch, dist)
    coll.forward(torch.zeros(1), 2, ("pg", (0, 2, 5)))
    assert dist.calls == expect
