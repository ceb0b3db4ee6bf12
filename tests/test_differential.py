"""Differential mode (`cpcheck diff`): the reference profile modelling a release against that
release, scheduler decision by scheduler decision. Where they first differ says where the
reference stops modelling SGLang; these tests pin that place, so a profile that models more
(or less) moves it visibly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scenarios.campaigns.differential import differential, first_difference
from scenarios.generate.catalog import load_scenario
from tests.sglang_envs import need


def _result(rank: int, rows: list[tuple[str, str, str]]) -> SimpleNamespace:
    decisions = [SimpleNamespace(kind=k, rid=r, outcome=o) for k, r, o in rows]
    return SimpleNamespace(rank=rank, decisions={"scheduler": decisions})


def test_first_difference_names_the_earliest_decision_on_any_rank() -> None:
    same = [("writing_check", "", "ack 0 writes"), ("drain", "", "revoke 1")]
    ref = [_result(0, same), _result(1, same)]
    assert first_difference(ref, [_result(0, same), _result(1, same)]) is None
    late = [_result(0, same[:1] + [("drain", "", "revoke 0")]), _result(1, same)]
    assert first_difference(ref, late) == (0, 1, same[1], ("drain", "", "revoke 0"))
    short = [_result(0, same), _result(1, same[:1])]
    assert first_difference(ref, short) == (1, 1, same[1], "<nothing>")
    # what only one SUT logs after ";" (0.5.16+'s hit-queue notes) is not a difference
    noted = [_result(0, [same[0], ("drain", "", "revoke 1; hit queue 0")]), _result(1, same)]
    assert first_difference(ref, noted) is None


@pytest.mark.sglang
def test_0_5_20_first_differs_at_the_drain() -> None:
    """0.5.20 inserts a 0-hit prefetch with 0 tokens where the reference revokes it (docs/findings/
    differential.md): decision #2, not #0 (the writing_check early return, now modelled)."""
    need("0.5.20")
    same, msg = differential(load_scenario("write_acks"), "0.5.20")
    assert not same
    assert "decision #2" in msg and "'drain'" in msg, msg


@pytest.mark.sglang
def test_0_5_14_profile_models_its_writing_check() -> None:
    """Judged with sglang-0.5.13 (as before the 0.5.14 profile), 0.5.14 differs at the first
    decision: it reduces in writing_check with nothing in flight. With its own profile the first
    difference moves past it, to the drain's host-release queue (also unmodelled for 0.5.13)."""
    need("0.5.14")
    s = load_scenario("write_acks")
    same, old = differential(s, "0.5.14", protocol="sglang-0.5.13")
    assert not same and "decision #0" in old and "'writing_check'" in old, old
    same, new = differential(s, "0.5.14")
    assert not same and "reference sglang-0.5.14" in new, new
    assert "decision #2" in new and "'drain'" in new, new
