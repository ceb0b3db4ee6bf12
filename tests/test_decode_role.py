"""The decode side of PD disaggregation (`decode_add`): SGLang's decode_hicache_mixin restores
a request's prefix locally (device, host or storage) before the KV poll lets it run.

The reference does not model it: such a Schedule is 125 there, never a vacuous agree. On SGLang
(0.5.13 .. 0.5.23; soak: pool starts) the restore agrees and restores the pages the prefill side
wrote. With one rank's load-back copy late, 0.5.13 .. 0.5.20's event check
(`is_load_back_event_done`, run on each rank's own event) calls `loading_check` (a MIN
all-reduce) on the rank whose copy is done only: the replay files in scenarios/corpus/sglang/
keep it. 0.5.23 agrees there: its `is_load_back_event_done` only queries the event (no
`loading_check`, which stays in `check_hicache_events` with a rank-agreed finish count), and a
restore that one rank sees READY and another PENDING is reconciled by the KV poll's MIN (the
gated poll says Transferring while PENDING), so every rank waits the same steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.core.errors import CannotJudge, ScheduleError
from scenarios.core.schedule import Op, Schedule
from scenarios.store.replay import read_replay
from scenarios.sut.sglang.paths_schedules import decode_restore
from tests.sglang_envs import need, shared
from tests.subprocess_env import REPO

CORPUS = REPO / "scenarios" / "corpus" / "sglang"
L3_RESTORE = {"0.5.13": ("done", 16, ()), "0.5.20": ("restore_failed", 0, ()),
              "0.5.23": ("restore_failed", 0, ())}
SKEWED = {"0.5.13": "replay-sglang-0.5.13-dpattn-1x2-103e53d301fe.json",
          "0.5.20": "replay-sglang-0.5.20-dpattn-1x2-76384add4903.json"}


def test_decode_add_is_a_request_with_its_own_id() -> None:
    s = decode_restore("reference")
    assert [o.kind for o in s.ops].count("decode_add") == 2
    with pytest.raises(ValueError, match="needs rid and tokens"):
        Op(kind="decode_add", rid="d")
    dup = s.model_dump()
    dup["ops"].append({"kind": "decode_add", "rid": "p1", "tokens": [1]})
    with pytest.raises(ScheduleError, match="duplicate request id 'p1'"):
        Schedule.from_dict(dup)
    ok = s.model_dump()
    ok["ops"].append({"kind": "abort", "rid": "d1"})  # a decode request can be aborted
    assert Schedule.from_dict(ok).ops[-1].rid == "d1"


def test_the_reference_cannot_judge_the_decode_side(inprocess_executor) -> None:
    with pytest.raises(CannotJudge, match="decode side of PD disaggregation"):
        inprocess_executor.run(decode_restore("reference"))


@pytest.mark.soak
@pytest.mark.sglang
@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", sorted(L3_RESTORE))
def test_decode_restore_agrees_and_a_late_load_back_copy_splits_the_collectives(
        version: str) -> None:
    need(version)
    from scenarios.judge.judging import run_checked

    ex = shared(version)
    results, v = run_checked(ex, decode_restore(f"sglang=={version}"))
    assert v.status == "agree", v.summary()
    for r in results:
        restored = {o.rid: o for o in r.outcomes if o.rid.startswith("d")}
        # one prefix from storage (L3), one from host (L2): 16 tokens each, every page intact;
        # 0.5.20+ checks the L3 prefetch in the step that started it, and under best_effort
        # terminates it before the drain allocated its hit: nothing loaded, restore FAILED
        # (0.5.23: the gated poll turns it into Failed, so every rank aborts it)
        assert {rid: (o.status, o.device_hit, o.bad_pages) for rid, o in restored.items()} == {
            "d1": L3_RESTORE[version], "d2": ("done", 16, ())}
        kinds = [d.kind for d in r.decisions["scheduler"]]
        assert kinds.count("decode_prefix") == 2 and "decode_poll" in kinds
    if version not in SKEWED:
        return  # 0.5.23 agrees there: test_a_late_load_back_copy_splits_0_5_20_...
    s, data = read_replay(CORPUS / SKEWED[version])
    _, skewed = run_checked(ex, s)
    assert skewed.invariant == data["expect_by_release"][f"sglang=={version}"], skewed.summary()


def _late_load_back_copy(trace: tuple, schedule: Schedule, rank: int) -> Schedule:
    """`schedule` with `rank`'s load-back copy held back from the step that opens it up to and
    including the decode side's next restore check (`load_back_event`), read off an unskewed
    run's pacer trace: the points move between releases, a fixed choice index would not."""
    opens = next(i for i, (_, stream, n) in enumerate(trace) if stream == "load" and n > 0)
    check = next(i for i in range(opens, len(trace)) if trace[i][0] == "load_back_event")
    choices = list(schedule.choices[rank])
    for i in range(opens, check + 1):
        if trace[i][1] == "load":
            choices[i] = 0
    return schedule.with_(choices={**schedule.choices, rank: choices})


#: the late load-back copy of `_late_load_back_copy` on each release: None = agrees
LATE_COPY = {"0.5.20": "collectives", "0.5.23": None}


@pytest.mark.soak
@pytest.mark.sglang
@pytest.mark.timeout(600)
@pytest.mark.parametrize("version", sorted(LATE_COPY))
def test_a_late_load_back_copy_splits_0_5_20_and_is_reconciled_by_0_5_23_kv_poll(
        version: str) -> None:
    """Rank 1's load-back copy late at the restore check, the points read off this release's
    own trace. On 0.5.20 that is the corpus file's skew (same choices) and rank 0's event check
    runs `loading_check` alone. On 0.5.23 rank 0 sees the restore READY, rank 1 PENDING (the
    decode_poll's local restore status), yet no rank issues a collective the other does not
    (the event check no longer runs `loading_check`), and the MIN of the gated polls keeps both
    waiting until rank 1's copy is done: they agree, and d2 is restored intact."""
    need(version)
    from scenarios.judge.judging import run_checked

    ex = shared(version)
    found, _ = read_replay(CORPUS / SKEWED["0.5.20"])
    base = found.with_(sut=f"sglang=={version}",
                       choices={r: [59] * len(c) for r, c in found.choices.items()})
    plain, v = run_checked(ex, base, gated=True)
    assert v.status == "agree", v.summary()
    s = _late_load_back_copy(plain[1].pacer_trace, base, rank=1)
    if version == "0.5.20":
        assert s.choices == found.choices
    results, v = run_checked(ex, s, gated=True)
    assert v.invariant == LATE_COPY[version], v.summary()
    if LATE_COPY[version] is not None:
        return
    by_rank = {r.rank: r for r in results}
    checks = [[t for t in by_rank[r].pacer_trace if t[0] == "load_back_event"] for r in (0, 1)]
    assert any(a[2] > b[2] for a, b in zip(*checks, strict=True)), checks  # rank 1 behind
    status = [[d.local[1] for d in by_rank[r].decisions["scheduler"]
               if d.kind == "decode_poll" and d.rid == "d2"] for r in (0, 1)]
    assert any(a != b for a, b in zip(*status, strict=True)), status  # READY vs PENDING
    assert {(o.rid, o.status, o.device_hit) for r in results for o in r.outcomes
            if o.rid == "d2"} == {("d2", "done", 16)}


@pytest.mark.soak
@pytest.mark.sglang
@pytest.mark.timeout(600)
def test_a_release_without_the_decode_mixin_cannot_judge_it() -> None:
    need("0.5.11")
    from scenarios.judge.judging import run_checked

    _, v = run_checked(shared("0.5.11"), decode_restore("sglang==0.5.11"))
    assert v.status == "unknown" and "decode_hicache_mixin" in v.diagnosis, v.summary()


def test_every_skewed_replay_file_exists() -> None:
    for name in SKEWED.values():
        assert Path(CORPUS / name).is_file()
