"""The variant switch and the two places the CP bug lives: the sync groups and the key suffix.

`fixed` must reduce over attention-CP then attention-TP (global agreement over a CP x TP grid);
`tp_only_sync` reduces over the TP group only (the bug before PR #20460), and
`cp_rank_in_key` makes CP peers use different storage keys for the same page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.api import CacheConfig, ParallelGroups, RankInfo, open_rank
from reference.hashing import page_hashes
from reference.hiradix_cache import HiRadixCache
from reference.sync import RankSet, sync_rank_sets
from reference.variants import VARIANTS, UnknownVariantError, check_variant

# at least 100; a larger Hypothesis profile (e.g. nightly) raises it
EXAMPLES = max(100, settings.default.max_examples)

# -- check_variant -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "Fixed", "tp_only", "fixed ", "cp-rank-in-key"])
def test_unknown_variant_is_one_line_listing_all(name: str) -> None:
    with pytest.raises(UnknownVariantError) as info:
        check_variant(name)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(name) in msg
    for known in VARIANTS:
        assert known in msg


@pytest.mark.parametrize("name", list(VARIANTS))
def test_known_variants_pass(name: str) -> None:
    assert check_variant(name) == name


def test_fixed_and_bug_variants_exist() -> None:
    assert {"fixed", "tp_only_sync", "cp_rank_in_key"} <= set(VARIANTS)
    assert all(VARIANTS[n].strip() for n in VARIANTS)


class NoCollectives:
    """For cache construction without peers: any reduction is a test failure."""

    rank = 0

    def __init__(self) -> None:
        self.new_groups_calls: list[tuple[list[RankSet], str]] = []

    def new_groups(self, rank_sets: Sequence[RankSet], tag: str) -> list[Any]:
        self.new_groups_calls.append((list(rank_sets), tag))
        return [None] * len(rank_sets)

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        raise AssertionError("no collective expected")


def test_open_rank_rejects_unknown_variant() -> None:
    with pytest.raises(UnknownVariantError, match="unknown variant 'bogus'"):
        open_rank(CacheConfig(variant="bogus"), RankInfo(), ParallelGroups(tp=(0,)),
                  NoCollectives())


# -- sync rank sets ----------------------------------------------------------------------------

# TP2 x CP2, rank = cp_index * tp_size + tp_index; rank 0's groups
GRID = ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0, 2))


@pytest.mark.parametrize(
    ("groups", "fixed", "tp_only"),
    [
        # CP x TP: CP group first, then TP
        (GRID, [(0, 2), (0, 1)], [(0, 1)]),
        # TP1 x CP2: the TP group is a single rank; only the fix syncs the CP peers
        (ParallelGroups(tp=(0,), attn_tp=(0,), attn_cp=(0, 1)), [(0, 1)], []),
        # TP2 x CP1: single-rank CP group skipped
        (ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0,)), [(0, 1)], [(0, 1)]),
        # the same rank set twice is one group
        (ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(1, 0)), [(0, 1)], [(0, 1)]),
        # neither attention group: fall back to the TP group
        (ParallelGroups(tp=(0, 1, 2, 3)), [(0, 1, 2, 3)], [(0, 1, 2, 3)]),
        (ParallelGroups(tp=(0,)), [], []),
        # only one of the attention groups given: no fallback to TP
        (ParallelGroups(tp=(0, 1), attn_cp=(0, 2)), [(0, 2)], [(0, 1)]),
        # PP appended (fixed only), after the attention groups
        (ParallelGroups(tp=(0, 1), attn_tp=(0, 1), attn_cp=(0, 2), pp=(0, 4)),
         [(0, 2), (0, 1), (0, 4)], [(0, 1)]),
        (ParallelGroups(tp=(0, 1), pp=(0, 2)), [(0, 1), (0, 2)], [(0, 1)]),
        (ParallelGroups(tp=(0,), pp=(0,)), [], []),
        # rank sets are normalised (sorted) so every member names the group alike
        (ParallelGroups(tp=(1, 0), attn_tp=(1, 0), attn_cp=(2, 0)), [(0, 2), (0, 1)], [(0, 1)]),
    ],
)
def test_sync_rank_sets(groups: ParallelGroups, fixed: list[RankSet],
                        tp_only: list[RankSet]) -> None:
    assert sync_rank_sets(groups) == fixed
    assert sync_rank_sets(groups, "sglang-0.5.20") == fixed
    assert sync_rank_sets(groups, "sglang-0.5.10") == tp_only
    # 0.5.11 and 0.5.13 all-reduce over the attention groups only (no PP in the groups)
    pp = tuple(sorted(groups.pp)) if groups.pp and len(groups.pp) > 1 else None
    for name in ("sglang-0.5.11", "sglang-0.5.13"):
        assert sync_rank_sets(groups, name) == [g for g in fixed if g != pp]


def grid_groups(tp: int, cp: int, pp: int, rank: int) -> ParallelGroups:
    """Rank = (pp_index * cp + cp_index) * tp + tp_index; attention TP is the TP group."""
    stage, rest = divmod(rank, tp * cp)
    cp_i, tp_i = divmod(rest, tp)
    base = stage * tp * cp
    attn_tp = tuple(base + cp_i * tp + j for j in range(tp))
    attn_cp = tuple(base + i * tp + tp_i for i in range(cp))
    pp_group = tuple(s * tp * cp + rest for s in range(pp))
    return ParallelGroups(tp=attn_tp, attn_tp=attn_tp, attn_cp=attn_cp,
                          pp=pp_group if pp > 1 else None)


def simulate_reduce(world: int, sets: list[list[RankSet]], values: list[int]) -> list[int]:
    """Each rank MIN-reduces over its k-th group at step k, as SyncGroup.reduce does."""
    steps = {len(s) for s in sets}
    assert len(steps) == 1, "ranks would issue different numbers of collectives"
    v = list(values)
    for k in range(steps.pop()):
        for r in range(world):  # every member of a group names the same rank set
            for m in sets[r][k]:
                assert sets[m][k] == sets[r][k], f"rank {r} and {m} disagree on group {k}"
        v = [min(v[m] for m in sets[r][k]) for r in range(world)]
    return v


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    tp=st.integers(1, 3), cp=st.integers(1, 3), pp=st.integers(1, 2),
    data=st.data(),
)
def test_fixed_groups_agree_over_the_whole_grid(tp: int, cp: int, pp: int,
                                                data: st.DataObject) -> None:
    """Two-step MIN over the fixed groups reaches the MIN of every rank of the grid (all
    PP stages included); TP-only sync reaches it only when there is no CP and no PP."""
    world = tp * cp * pp
    values = data.draw(st.lists(st.integers(0, 100), min_size=world, max_size=world))
    groups = [grid_groups(tp, cp, pp, r) for r in range(world)]
    fixed = simulate_reduce(world, [sync_rank_sets(g) for g in groups], values)
    assert fixed == [min(values)] * world
    tp_only = simulate_reduce(world, [sync_rank_sets(g, "sglang-0.5.10") for g in groups], values)
    for r in range(world):
        assert tp_only[r] == min(values[m] for m in groups[r].tp)
    if cp == 1 and pp == 1:
        assert tp_only == fixed


# -- storage keys of HiRadixCache ----------------------------------------------------------


def cache_keys(variant: str, cp_rank: int, tp_rank: int = 0, is_mla: bool = False) -> list[str]:
    from reference.memory_pool import KVShape

    cfg = CacheConfig(page_size=4, device_pages=4, host_pages=4, variant=variant,
                      kv=KVShape(is_mla=is_mla, heads=1 if is_mla else 2))
    cache = HiRadixCache(cfg, RankInfo(tp_rank=tp_rank, tp_size=2, cp_rank=cp_rank, cp_size=2),
                         ParallelGroups(tp=(0,)), NoCollectives())
    try:
        hashes = page_hashes(list(range(12)), 4)
        return [k for page in cache.cache_controller.storage_keys(hashes) for k in page]
    finally:
        cache.shutdown()


@pytest.mark.parametrize("is_mla", [False, True])
def test_cp_rank_in_key_variant_splits_cp_peers(is_mla: bool) -> None:
    k0, k1 = cache_keys("cp_rank_in_key", 0, is_mla=is_mla), cache_keys("cp_rank_in_key", 1,
                                                                        is_mla=is_mla)
    assert len(k0) == len(k1) == 3 * (1 if is_mla else 2)
    assert all(a != b for a, b in zip(k0, k1, strict=True))


@pytest.mark.parametrize("variant", ["fixed", "tp_only_sync"])
@pytest.mark.parametrize("is_mla", [False, True])
def test_fixed_key_is_shared_by_cp_peers(variant: str, is_mla: bool) -> None:
    k0, k1 = cache_keys(variant, 0, is_mla=is_mla), cache_keys(variant, 1, is_mla=is_mla)
    assert k0 == k1
    hashes = page_hashes(list(range(12)), 4)
    if is_mla:
        assert k0 == [f"{h}__k" for h in hashes]
    else:
        assert k0 == [f"{h}_0_{p}" for h in hashes for p in "kv"]
    # TP peers of an MHA pool hold different head shards: different keys
    assert (cache_keys(variant, 0, tp_rank=1, is_mla=is_mla) == k0) is is_mla
