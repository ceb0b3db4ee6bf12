"""Layout parsing, rank mapping and group rank sets (pure arithmetic, no processes)."""

from __future__ import annotations

import itertools

import pytest

from scenarios.core.layout import GROUP_KINDS, MAX_WORLD, Layout, LayoutError, RankCoords

LAYOUTS = ["1x1", "1x2", "2x1", "2x2", "1x4", "4x1", "2x2x2", "3x2x2", "1x1x3"]


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2x2", Layout(2, 2, 1)),
        ("1x4", Layout(1, 4)),
        ("2x2x2", Layout(2, 2, 2)),
        (" 4X1 ", Layout(4, 1)),
        ("2x1x1", Layout(2, 1)),
    ],
)
def test_parse(text: str, expected: Layout) -> None:
    assert Layout.parse(text) == expected


@pytest.mark.parametrize("text", LAYOUTS)
def test_str_round_trips(text: str) -> None:
    layout = Layout.parse(text)
    assert Layout.parse(str(layout)) == layout
    assert str(layout).count("x") == (2 if layout.pp > 1 else 1)


def test_parse_passes_layout_through() -> None:
    layout = Layout(2, 2)
    assert Layout.parse(layout) is layout


@pytest.mark.parametrize("text", ["2y2", "2", "", "x2", "2x2x2x2", "a x b", "2.0x2", "2x"])
def test_unknown_layout_is_one_clear_line(text: str) -> None:
    with pytest.raises(LayoutError) as info:
        Layout.parse(text)
    msg = str(info.value)
    assert msg == f"unknown layout {text!r}: expected TPxCP or TPxCPxPP, e.g. 2x2"
    assert "\n" not in msg


def test_unknown_layout_message_matches_brief() -> None:
    with pytest.raises(
        LayoutError, match=r"^unknown layout '2y2': expected TPxCP or TPxCPxPP, e\.g\. 2x2$"
    ):
        Layout.parse("2y2")


@pytest.mark.parametrize(
    ("text", "bad"), [("0x2", "tp=0"), ("2x0", "cp=0"), ("2x2x0", "pp=0"), ("-1x2", "tp=-1")]
)
def test_non_positive_sizes_rejected(text: str, bad: str) -> None:
    with pytest.raises(LayoutError, match=f"sizes must be positive integers, got {bad}$"):
        Layout.parse(text)


@pytest.mark.parametrize(
    "kwargs", [{"tp": 0, "cp": 1}, {"tp": 1, "cp": -2}, {"tp": 1, "cp": 1, "pp": 0}]
)
def test_constructor_validates(kwargs: dict[str, int]) -> None:
    with pytest.raises(LayoutError, match="sizes must be positive integers"):
        Layout(**kwargs)


@pytest.mark.parametrize("value", [1.0, "2", True, None])
def test_constructor_rejects_non_int(value: object) -> None:
    with pytest.raises(LayoutError, match="positive integers"):
        Layout(value, 1)  # type: ignore[arg-type]


def test_max_world_named_in_error() -> None:
    with pytest.raises(LayoutError) as info:
        Layout.parse("4x4", max_world=8)
    assert str(info.value) == "layout '4x4' needs 16 ranks, above the limit of 8 (max_world)"
    with pytest.raises(LayoutError, match=f"limit of {MAX_WORLD}"):
        Layout.parse("9x9")
    assert Layout.parse("9x9", max_world=None).world_size == 81
    assert Layout.parse("2x4", max_world=8).world_size == 8  # the limit itself is allowed


def test_layout_is_frozen_and_hashable() -> None:
    layout = Layout(2, 2)
    with pytest.raises(AttributeError):
        layout.tp = 3  # type: ignore[misc]
    assert {Layout(2, 2), Layout.parse("2x2")} == {layout}


# -- rank mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", LAYOUTS)
def test_rank_mapping_formula_and_inverse(text: str) -> None:
    layout = Layout.parse(text)
    assert layout.world_size == layout.tp * layout.cp * layout.pp
    seen = set()
    for p, c, t in itertools.product(range(layout.pp), range(layout.cp), range(layout.tp)):
        rank = layout.rank_of(t, c, p)
        assert rank == p * (layout.tp * layout.cp) + c * layout.tp + t
        assert layout.coords(rank) == RankCoords(t, c, p)
        assert (layout.tp_rank(rank), layout.cp_rank(rank), layout.pp_rank(rank)) == (t, c, p)
        seen.add(rank)
    assert seen == set(range(layout.world_size))


def test_rank_mapping_2x2x2_examples() -> None:
    layout = Layout.parse("2x2x2")
    assert layout.coords(0) == (0, 0, 0)
    assert layout.coords(1) == (1, 0, 0)
    assert layout.coords(2) == (0, 1, 0)
    assert layout.coords(5) == (1, 0, 1)
    assert layout.coords(7) == (1, 1, 1)


@pytest.mark.parametrize("rank", [-1, 4, 100])
def test_rank_out_of_range(rank: int) -> None:
    with pytest.raises(LayoutError, match=rf"rank {rank} is outside layout '2x2' \(world size 4\)"):
        Layout(2, 2).coords(rank)
    with pytest.raises(LayoutError):
        Layout(2, 2).tp_group(rank)


def test_rank_of_out_of_range() -> None:
    with pytest.raises(LayoutError, match="cp_rank=2 is outside layout '2x2'"):
        Layout(2, 2).rank_of(0, 2)


# -- groups --------------------------------------------------------------------------------------

EXPECTED = {
    "1x2": {
        "attn_tp": [(0,), (1,)],
        "attn_cp": [(0, 1)],
        "tp": [(0, 1)],
        "pp": [(0,), (1,)],
    },
    "2x1": {
        "attn_tp": [(0, 1)],
        "attn_cp": [(0,), (1,)],
        "tp": [(0, 1)],
        "pp": [(0,), (1,)],
    },
    "2x2": {
        "attn_tp": [(0, 1), (2, 3)],
        "attn_cp": [(0, 2), (1, 3)],
        "tp": [(0, 1, 2, 3)],
        "pp": [(0,), (1,), (2,), (3,)],
    },
    "1x4": {
        "attn_tp": [(0,), (1,), (2,), (3,)],
        "attn_cp": [(0, 1, 2, 3)],
        "tp": [(0, 1, 2, 3)],
        "pp": [(0,), (1,), (2,), (3,)],
    },
    "2x2x2": {
        "attn_tp": [(0, 1), (2, 3), (4, 5), (6, 7)],
        "attn_cp": [(0, 2), (1, 3), (4, 6), (5, 7)],
        "tp": [(0, 1, 2, 3), (4, 5, 6, 7)],
        "pp": [(0, 4), (1, 5), (2, 6), (3, 7)],
    },
}


@pytest.mark.parametrize("text", sorted(EXPECTED))
def test_group_rank_sets(text: str) -> None:
    layout = Layout.parse(text)
    for kind in GROUP_KINDS:
        assert layout.groups(kind) == EXPECTED[text][kind], kind


@pytest.mark.parametrize("text", LAYOUTS)
def test_each_rank_in_exactly_one_group_of_each_kind(text: str) -> None:
    layout = Layout.parse(text)
    sizes = {
        "attn_tp": layout.tp,
        "attn_cp": layout.cp,
        "tp": layout.tp * layout.cp,
        "pp": layout.pp,
    }
    for kind in GROUP_KINDS:
        groups = layout.groups(kind)
        flat = [r for g in groups for r in g]
        assert sorted(flat) == list(range(layout.world_size)), kind  # a partition
        assert all(len(g) == sizes[kind] for g in groups), kind
        for rank in range(layout.world_size):
            mine = layout.group(kind, rank)
            assert rank in mine
            assert [g for g in groups if rank in g] == [mine]
            assert list(mine) == sorted(mine)


@pytest.mark.parametrize("text", LAYOUTS)
def test_attn_tp_times_attn_cp_spans_tp_group(text: str) -> None:
    layout = Layout.parse(text)
    for rank in range(layout.world_size):
        tp_group = set(layout.tp_group(rank))
        # the grid: every (attn-TP peer's CP group) union covers the TP group exactly once
        spanned = [r for t in layout.attn_tp_group(rank) for r in layout.attn_cp_group(t)]
        assert sorted(spanned) == sorted(tp_group)
        assert set(layout.attn_tp_group(rank)) & set(layout.attn_cp_group(rank)) == {rank}
        # two-step MIN (CP then TP) reaches every rank of the TP group
        assert {r for c in layout.attn_cp_group(rank) for r in layout.attn_tp_group(c)} == tp_group
        # the PP group crosses stages at fixed (tp, cp)
        assert {layout.coords(r)[:2] for r in layout.pp_group(rank)} == {layout.coords(rank)[:2]}
        assert len({layout.pp_rank(r) for r in layout.pp_group(rank)}) == layout.pp


@pytest.mark.parametrize("text", LAYOUTS)
def test_all_groups_order_is_deterministic_and_complete(text: str) -> None:
    layout = Layout.parse(text)
    groups = layout.all_groups()
    assert groups == Layout.parse(text).all_groups()
    assert [k for k, _ in groups] == sorted((k for k, _ in groups), key=GROUP_KINDS.index)
    for kind in GROUP_KINDS:
        assert [g for k, g in groups if k == kind] == layout.groups(kind)
    assert len(groups) == len(set(groups))  # each (kind, ranks) once
    expected_count = layout.world_size // layout.tp + layout.world_size // layout.cp
    expected_count += layout.pp + layout.world_size // layout.pp
    assert len(groups) == expected_count


def test_all_groups_2x2_literal() -> None:
    assert Layout(2, 2).all_groups() == [
        ("attn_tp", (0, 1)),
        ("attn_tp", (2, 3)),
        ("attn_cp", (0, 2)),
        ("attn_cp", (1, 3)),
        ("tp", (0, 1, 2, 3)),
        ("pp", (0,)),
        ("pp", (1,)),
        ("pp", (2,)),
        ("pp", (3,)),
    ]


def test_unknown_group_kind() -> None:
    with pytest.raises(LayoutError, match="unknown group kind 'dp'"):
        Layout(2, 2).group("dp", 0)  # type: ignore[arg-type]
