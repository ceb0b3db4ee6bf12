"""The decode side of PD disaggregation (`decode_add`): SGLang's decode_hicache_mixin restores
a request's prefix locally (device, host or storage) before the KV poll lets it run.

The reference does not model it: such a Schedule is 125 there, never a vacuous agree. On SGLang
(0.5.13 .. 0.5.20; soak: pool starts) the restore agrees and restores the pages the prefill side
wrote, and with one rank's load-back copy late the release's own event check issues a
collective on that rank only: the replay files in scenarios/corpus/sglang/ keep it.
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
L3_RESTORE = {"0.5.13": ("done", 16, ()), "0.5.20": ("restore_failed", 0, ())}
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
@pytest.mark.parametrize("version", sorted(SKEWED))
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
        # 0.5.20 checks the L3 prefetch in the step that started it, and under best_effort
        # terminates it before the drain allocated its hit: nothing loaded, restore FAILED
        assert {rid: (o.status, o.device_hit, o.bad_pages) for rid, o in restored.items()} == {
            "d1": L3_RESTORE[version], "d2": ("done", 16, ())}
        kinds = [d.kind for d in r.decisions["scheduler"]]
        assert kinds.count("decode_prefix") == 2 and "decode_poll" in kinds
    s, data = read_replay(CORPUS / SKEWED[version])
    _, skewed = run_checked(ex, s)
    assert skewed.invariant == data["expect_by_release"][f"sglang=={version}"], skewed.summary()


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
