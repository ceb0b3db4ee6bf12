"""The protocol oracle: silent on correct runs, and each rule fires on a planted bug that keeps
every rank in agreement (so none of the six cross-rank invariants can see it)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from reference.api import DEFAULT_PROFILE, AckEffect, DrainEffect
from scenarios.core.layout import Layout
from scenarios.core.records import Decision, RankResult
from scenarios.core.schedule import Schedule
from scenarios.generate.catalog import catalog_names, load_scenario
from scenarios.generate.workload import ALL, STEP_POINTS, build_prefetch_schedule, warm_steps
from scenarios.judge.checker import INVARIANTS, check
from scenarios.judge.oracle import FREE_RUNNING_TICK_S, check_oracle, reduce_over, sync_stages
from scenarios.sut.reference_rank import RunEnv, cache_config
from tests.oracle_plants import planted

PROGRESS_AT = warm_steps(DEFAULT_PROFILE) * STEP_POINTS + STEP_POINTS  # warm-up steps, then the first fetch's


def shaped(layout: str, policy: str, intent: str, **kw) -> Schedule:  # noqa: ANN003
    args = dict(shared_len=24, batch_pages=1, mla=False, picks=[[2, 3, 2, 3]],
                fault_batch=[1], fault_rank=[1])
    args.update(kw)
    return build_prefetch_schedule(layout, policy, [intent], **args)


def one_rank_behind(layout: str, policy: str, **kw) -> Schedule:  # noqa: ANN003
    """Every rank has all its IO batches in at the progress point except rank 1 (one batch)."""
    s = shaped(layout, policy, "complete", **kw)
    choices = {r: list(c) for r, c in s.choices.items()}
    assert choices[1][PROGRESS_AT] == ALL
    choices[1][PROGRESS_AT] = 1
    return s.with_(choices=choices)


def exists_fault(layout: str) -> Schedule:
    """Rank 1's hit query fails: its local hit count is 0, the other ranks' is 6 pages."""
    return shaped(layout, "best_effort", "complete").with_(faults={1: [["exists", 0]]})


#: plant -> (schedule, the rule that must report it)
CASES = {
    "hits_max": (lambda lay: exists_fault(lay), "reduce"),
    "terminate_min": (lambda lay: one_rank_behind(lay, "wait_complete"), "reduce"),
    "acks_one_short": (lambda lay: load_scenario("write_acks").with_(layout=lay), "acks"),
    "threshold": (lambda lay: shaped(lay, "best_effort", "partial"), "revoke"),
    "insert_short": (lambda lay: shaped(lay, "best_effort", "complete"), "insert"),
    "terminate_ignored": (lambda lay: one_rank_behind(lay, "wait_complete"), "terminate"),
    "wait_complete_early": (lambda lay: one_rank_behind(lay, "wait_complete"), "wait_complete"),
    "timeout_early": (lambda lay: shaped(lay, "timeout", "terminated", timeout_ticks=8), "timeout"),
    "best_effort_waits": (lambda lay: shaped(lay, "best_effort", "terminated"), "best_effort"),
}


def rules_of(verdict) -> set[str]:  # noqa: ANN001
    return {m.split("'")[1] for inv, m in verdict.failures if inv == "oracle"}


def test_oracle_is_the_seventh_check() -> None:
    assert INVARIANTS[-1] == "oracle" and len(INVARIANTS) == 7


@pytest.mark.parametrize("layout", ["1x2", "2x2"])
@pytest.mark.parametrize("plant", sorted(CASES))
def test_each_rule_fires_on_a_bug_that_keeps_ranks_in_agreement(inprocess_executor, plant: str,
                                                                layout: str) -> None:
    make, rule = CASES[plant]
    s = make(layout)
    clean = check(s, inprocess_executor.run(s))
    assert clean.ok, f"without the bug: {clean.summary()}"
    with planted(plant):
        v = check(s, inprocess_executor.run(s))
    assert not v.ok, f"{plant} went unnoticed"
    assert {inv for inv, _ in v.failures} == {"oracle"}, v.failures[:3]
    assert v.invariant == "oracle" and rule in rules_of(v), v.failures[:3]
    assert f"rule '{rule}'" in v.message or any(f"rule '{rule}'" in m for _, m in v.failures)


@pytest.mark.parametrize("name", catalog_names())
@pytest.mark.parametrize("layout", ["1x2", "2x2", "2x1"])
def test_oracle_silent_on_the_catalog(inprocess_executor, name: str, layout: str) -> None:
    s = load_scenario(name).with_(layout=layout)
    assert check_oracle(s, inprocess_executor.run(s)) == []


def test_violation_names_decision_ranks_locals_expected_actual(inprocess_executor) -> None:
    s = exists_fault("1x2")
    with planted("hits_max"):
        v = check(s, inprocess_executor.run(s))
    msg = next(m for inv, m in v.failures if inv == "oracle" and "'reduce'" in m)
    for part in ("prefetch_hits(f0)", "ranks [0, 1]", "locals {0: [6], 1: [0]}",
                 "MIN", "expects [0]", "actual [6]"):
        assert part in msg, msg


def test_profiles_pick_the_sync_groups() -> None:
    def names(layout: str, protocol: str, dp: bool = True) -> list[tuple[str, tuple[int, ...]]]:
        s = SimpleNamespace(layout_obj=Layout.parse(layout), protocol=protocol, dp_attention=dp)
        return [(n, f(0)) for n, f in sync_stages(s)]

    assert names("2x2", "sglang-0.5.10") == [("attn_tp", (0, 1))]
    assert names("2x2", "sglang-0.5.10", dp=False) == [("tp", (0, 1, 2, 3))]
    assert names("1x2", "sglang-0.5.10") == []  # a TP world of one: no reduce at all
    assert names("2x2", "sglang-0.5.11") == [("attn_cp", (0, 2)), ("attn_tp", (0, 1))]
    assert names("2x2", "sglang-0.5.20", dp=False) == [("attn_cp", (0, 2)), ("attn_tp", (0, 1))]
    assert names("1x2x2", "sglang-0.5.11") == [("attn_cp", (0, 1))]
    assert names("1x2x2", "sglang-0.5.20") == [("attn_cp", (0, 1)), ("pp", (0, 2))]
    assert names("1x2x2", "sglang-0.5.13")[-1][0] == "pp_forward"
    assert names("2x2", "no-version-here") == names("2x2", "sglang-0.5.20")
    alias = SimpleNamespace(layout_obj=Layout.parse("2x2"), protocol="sglang-0.5.20",
                            dp_attention=False, variant="tp_only_sync")
    assert [(n, f(0)) for n, f in sync_stages(alias)] == names("2x2", "sglang-0.5.10")


def test_reduce_runs_the_groups_in_order() -> None:
    s = SimpleNamespace(layout_obj=Layout.parse("2x2"), protocol="sglang-0.5.20")
    got = reduce_over(sync_stages(s), (0, 1, 2, 3), {0: [5], 1: [3], 2: [7], 3: [4]}, "min")
    assert got == {r: (3,) for r in range(4)}
    s10 = SimpleNamespace(layout_obj=Layout.parse("2x2"), protocol="sglang-0.5.10")
    assert reduce_over(sync_stages(s10), (0, 1), {0: [5], 1: [3]}, "max") == {0: (5,), 1: (5,)}


def test_tp_only_sync_is_right_for_0_5_10_and_wrong_for_0_5_20(inprocess_executor) -> None:
    """`tp_only_sync` is an alias of sglang-0.5.10 with DP attention: the oracle judges its run
    under that profile and accepts each TP group's reduction (the cross-rank invariants catch
    the CP divergence); the same logs judged as a sglang-0.5.20 run break the reduce rule."""
    s = one_rank_behind("2x2", "best_effort").with_(variant="tp_only_sync")
    results = inprocess_executor.run(s)
    assert check(s, results).invariant == "decisions"
    assert check_oracle(s, results) == []
    assert check_oracle(s.with_(variant="fixed", protocol="sglang-0.5.10"), results) == []
    as_0_5_20 = s.with_(variant="fixed", protocol="sglang-0.5.20")
    assert "reduce" in {r for r, _ in check_oracle(as_0_5_20, results)}


def test_free_running_tick_matches_the_runner() -> None:
    s = shaped("1x2", "timeout", "complete", timeout_ticks=3)
    free = cache_config(s, RunEnv(rank=0, run_id="x", gated=False))
    assert free.prefetch_timeout_s == pytest.approx(3 * FREE_RUNNING_TICK_S)
    assert cache_config(s, RunEnv(rank=0, run_id="x")).prefetch_timeout_s == 3.0


@pytest.mark.cp
def test_a_planted_bug_is_reported_by_the_oracle_under_torchrun(torchrun_executor) -> None:
    s = shaped("1x2", "best_effort", "partial")
    pool = torchrun_executor.pool(s.layout)
    payload = {"schedule": s.model_dump_json(), "run_id": f"r{uuid.uuid4().hex[:10]}",
               "gated": True, "storage_root": torchrun_executor.storage_root,
               "mooncake_master": "", "collective_timeout_s": torchrun_executor.timeout_s,
               "plant": "threshold"}
    v = check(s, pool.run("tests.oracle_plants:run_planted", payload, timeout_s=120))
    assert {inv for inv, _ in v.failures} == {"oracle"} and "revoke" in rules_of(v), v.failures[:3]
    assert check(s, torchrun_executor.run(s)).ok  # the workers are clean again


def _logs(kind: str, rows: dict[int, tuple[list[int], list[int], str]]) -> list[RankResult]:
    return [RankResult(rank=r, decisions={"scheduler": (Decision.of((kind, "", local, agreed,
                                                                      outcome)),)},
                       effects={"scheduler": (AckEffect(agreed[0], agreed[0]),)})
            for r, (local, agreed, outcome) in rows.items()]


@pytest.mark.parametrize(("kind", "protocol", "outcome"), [
    ("loading_check", "sglang-0.5.11", "ack {} loads"),
    ("writing_check", "sglang-0.5.20", "ack {} writes (write-back)"),
])
def test_decisions_without_a_collective_are_judged_locally(kind: str, protocol: str,
                                                           outcome: str) -> None:
    """No collective: each rank acts on its own count (different counts are fine), and an
    agreed value that is not the local one breaks the reduce rule."""
    s = load_scenario("write_acks").with_(protocol=protocol)
    own = _logs(kind, {0: ([2], [2], outcome.format(2)), 1: ([3], [3], outcome.format(3))})
    assert check_oracle(s, own) == []
    off = _logs(kind, {0: ([2], [1], outcome.format(1)), 1: ([3], [3], outcome.format(3))})
    assert [r for r, m in check_oracle(s, off) if "on rank 0" in m] == ["reduce"]
    # the same counts from a decision that reduces (MIN) must agree
    synced = s.with_(protocol="sglang-0.5.20")
    reduced = _logs(kind, {0: ([2], [2], "ack 2"), 1: ([3], [3], "ack 3")})
    assert "reduce" in {r for r, _ in check_oracle(synced, reduced)}


def _pp_logs(kind: str, locals_: dict[int, list[int]],
             agreed: dict[int, list[int]]) -> list[RankResult]:
    return [RankResult(rank=r,
                       decisions={"scheduler": (Decision.of((kind, "", locals_[r], agreed[r],
                                                             "x")),)},
                       effects={"scheduler": (DrainEffect(*agreed[r]) if kind == "drain" else
                                              AckEffect(agreed[r][0], agreed[r][0]),)})
            for r in locals_]


def test_0_5_13_forwards_stage_0_only_for_the_ack_checks() -> None:
    """1x2x2 (ranks 0, 1 = stage 0; 2, 3 = stage 1). writing_check / loading_check: a later
    stage's agreed count is stage 0's (its own MIN would break the rule); the drain is agreed
    inside each stage (stage 0's value on stage 1 breaks it)."""
    s = load_scenario("write_acks").with_(layout="1x2x2", protocol="sglang-0.5.13")
    locals_ = {0: [2], 1: [3], 2: [1], 3: [4]}
    for kind in ("writing_check", "loading_check"):
        forwarded = {0: [2], 1: [2], 2: [2], 3: [2]}
        assert check_oracle(s, _pp_logs(kind, locals_, forwarded)) == []
        per_stage = {0: [2], 1: [2], 2: [1], 3: [1]}
        found = check_oracle(s, _pp_logs(kind, locals_, per_stage))
        assert [r for r, _ in found] == ["reduce", "reduce"], found
        assert "forwards PP stage 0's count" in found[0][1] and "on rank 2" in found[0][1]
        # the same per-stage values are right under 0.5.11 (no PP agreement at all)
        if kind == "writing_check":
            assert check_oracle(s.with_(protocol="sglang-0.5.11"),
                                _pp_logs(kind, locals_, per_stage)) == []
    drain_locals = {r: [v[0], 0, 0] for r, v in locals_.items()}
    per_stage = {0: [2, 0, 0], 1: [2, 0, 0], 2: [1, 0, 0], 3: [1, 0, 0]}
    assert check_oracle(s, _pp_logs("drain", drain_locals, per_stage)) == []
    forwarded = {r: [2, 0, 0] for r in range(4)}
    found = check_oracle(s, _pp_logs("drain", drain_locals, forwarded))
    assert {r for r, _ in found} == {"reduce"} and "on ranks [2, 3]" in found[0][1], found


@pytest.mark.parametrize("kind", ["writing_check", "loading_check", "drain", "can_terminate"])
def test_0_5_20_releases_forward_stage_0s_scheduler_agreements(kind: str) -> None:
    """1x2x2 (ranks 0, 1 = stage 0; 2, 3 = stage 1). A 0.5.20+ wheel reduces the scheduler's
    checks on stage 0 and forwards the value (`_all_reduce` -> `_pp_sync`): on the release,
    every stage holds stage 0's reduction; the reference's `sglang-0.5.20` profile reduces over
    PP too (MIN / MAX over all four), and each is judged against its own model."""
    width = 3 if kind == "drain" else 2 if kind == "can_terminate" else 1
    locals_ = {0: [4] * width, 1: [3] * width, 2: [1] * width, 3: [5] * width}
    pick = max if kind == "can_terminate" else min
    stage0 = [pick(4, 3)] * width
    everyone = [pick(4, 3, 1, 5)] * width
    assert stage0 != everyone
    # wait_complete: best_effort's can_terminate issues no collective
    release = shaped("1x2x2", "wait_complete", "complete").with_(
        protocol="sglang-0.5.20", sut="sglang==0.5.20")
    forwarded = {r: stage0 for r in range(4)}
    over_pp = {r: everyone for r in range(4)}
    assert [r for r, _ in check_oracle(release, _pp_logs(kind, locals_, forwarded))
            if r == "reduce"] == []
    found = [m for r, m in check_oracle(release, _pp_logs(kind, locals_, over_pp))
             if r == "reduce"]
    assert found and "forwarded" in found[0], found
    reference = release.with_(sut="reference")
    assert [r for r, _ in check_oracle(reference, _pp_logs(kind, locals_, over_pp))
            if r == "reduce"] == []
    assert [r for r, _ in check_oracle(reference, _pp_logs(kind, locals_, forwarded))
            if r == "reduce"]


def test_0_5_20_releases_keep_pp_in_the_controllers_hit_reduce() -> None:
    """The storage hit count is the controller's (`prefetch_hits_sync_groups` holds the PP
    group): on the release too, the MIN runs over every stage."""
    s = load_scenario("write_acks").with_(layout="1x2x2", protocol="sglang-0.5.20",
                                          sut="sglang==0.5.20")
    locals_ = {0: [4], 1: [3], 2: [1], 3: [5]}
    logs = [RankResult(rank=r, decisions={"prefetch_sync": (Decision.of(
        ("prefetch_hits", "q", locals_[r], agreed, "x")),)})
        for r, agreed in {0: [3], 1: [3], 2: [3], 3: [3]}.items()]
    assert [r for r, _ in check_oracle(s, logs) if r == "reduce"] == ["reduce"]
    logs = [RankResult(rank=r, decisions={"prefetch_sync": (Decision.of(
        ("prefetch_hits", "q", locals_[r], [1], "x")),)}) for r in range(4)]
    assert [r for r, _ in check_oracle(s, logs) if r == "reduce"] == []
