"""Typed rank results: errors classified by the exception's type (never its words), records that
survive pickle (torchrun workers) and JSON, and the checker ordering causes before waits."""

from __future__ import annotations

import dataclasses
import json
import pickle
import threading
from typing import Any

import pytest
import torch

from reference.api import AgreementTimeout, HiCacheError, TorchCollectives
from scenarios.client.gates import GateTimeout
from scenarios.client.recorder import RecordingCollectives
from scenarios.core.errors import CollectiveError, ErrorKind
from scenarios.core.records import Decision, RankError, RankResult, error_kind
from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check
from scenarios.runner.inprocess import CollectiveTimeout, RunAborted, ThreadWorld
from scenarios.sut import reference_rank as rank_run

#: every word the old text matching took for "a peer never came"
WAITING_WORDS = "Timeout: timed out, Timed out, not agreed, did not finish, never joined"


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise exc from cause
    except BaseException as e:  # noqa: BLE001
        return e


def test_kind_comes_from_the_type_not_the_message() -> None:
    assert error_kind(RuntimeError(WAITING_WORDS)) is ErrorKind.FAILED
    assert error_kind(HiCacheError(WAITING_WORDS)) is ErrorKind.FAILED
    for waited in (GateTimeout("boom"), CollectiveTimeout("boom"), AgreementTimeout("boom"),
                   CollectiveError("boom")):
        assert error_kind(waited) is ErrorKind.WAITED, type(waited)
    assert error_kind(RunAborted("boom")) is ErrorKind.STOPPED
    # a dead IO thread surfaces as HiCacheError raised from what killed it
    assert error_kind(_raised(HiCacheError("thread died"), GateTimeout("x"))) is ErrorKind.WAITED
    assert error_kind(_raised(HiCacheError("thread died"), KeyError("x"))) is ErrorKind.FAILED


def test_a_dead_io_thread_keeps_its_exception_as_the_cause() -> None:
    """reference's check_threads raises from the first thread's exception, which decides."""
    from reference.api import CacheConfig
    from tests.test_single_rank_e2e import Rank  # one real rank, no storage

    rank = Rank(CacheConfig(page_size=4), None)
    ctrl = rank.sched.cache.cache_controller
    def held() -> None:
        raise GateTimeout("held at a gate")

    ctrl._guard(held)()  # how every IO thread of the controller runs
    with pytest.raises(HiCacheError) as info:
        ctrl.check_threads()
    assert isinstance(info.value.__cause__, GateTimeout)
    assert error_kind(info.value) is ErrorKind.WAITED
    rank.sched.shutdown()


class _FailingGloo(TorchCollectives):
    """torch.distributed's way to fail: a bare RuntimeError (no process group needed here)."""

    def __init__(self) -> None:
        self.rank = 0

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        raise RuntimeError("[gloo] Connection closed by peer")


class _Mismatch:
    rank = 0

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        raise RuntimeError("collective mismatch on g[0, 1]: timed out")


def test_a_failed_torch_collective_is_typed_where_the_call_is_known() -> None:
    coll = RecordingCollectives(_FailingGloo())
    with pytest.raises(CollectiveError) as info:
        coll.all_reduce(torch.zeros(1), "min", ("g[0, 1]", None))
    assert error_kind(info.value) is ErrorKind.WAITED
    assert "all_reduce over g[0, 1]" in str(info.value)
    # the call that never returned stays pending, so the report says what the rank waited on
    assert list(coll.pending_text().values()) == ["all_reduce MIN [1] float32 in ? over g[0, 1]"]
    # any other collectives' RuntimeError (the in-process mismatch) is left as it is: a cause
    with pytest.raises(RuntimeError) as info2:
        RecordingCollectives(_Mismatch()).all_reduce(torch.zeros(1), "min", ("g[0, 1]", None))
    assert type(info2.value) is RuntimeError and error_kind(info2.value) is ErrorKind.FAILED


def _result(rank: int, error: RankError | None) -> RankResult:
    return RankResult(rank=rank, coords=(0, rank, 0), error=error, ops_done=3)


def test_checker_names_the_failed_rank_first_whatever_the_words() -> None:
    """The waiting rank's message has no waiting word, the failed one's has them all: the old
    text matching ordered them the other way round."""
    s = load_scenario("write_acks")
    waited = RankError(ErrorKind.WAITED, "CollectiveTimeout", "boom")
    failed = RankError(ErrorKind.FAILED, "RuntimeError", WAITING_WORDS)
    v = check(s, [_result(0, waited), _result(1, failed)])
    assert [(inv, m.split(" failed")[0]) for inv, m in v.failures] == [("error", "rank 1"),
                                                                      ("error", "rank 0")]
    assert "[failed]" in v.failures[0][1] and "[waited]" in v.failures[1][1]


def test_a_rank_that_fails_on_its_own_is_the_cause_end_to_end(monkeypatch) -> None:
    """In-process 1x2: rank 1 raises mid-run (its message says "timed out"); rank 0 then times
    out in a collective. The kinds come from the types, and the verdict names rank 1."""
    apply = rank_run._apply
    seen = {"n": 0}

    def planted(sched: Any, op: Any) -> None:
        if threading.current_thread().name == "rank1":
            seen["n"] += 1
            if seen["n"] == 3:
                raise RuntimeError("planted: timed out, never joined")
        apply(sched, op)

    monkeypatch.setattr(rank_run, "_apply", planted)
    s = load_scenario("write_acks")
    from scenarios.runner.inprocess import run_schedule_inprocess
    from scenarios.sut.reference_rank import execute_inprocess

    results = run_schedule_inprocess(s, execute_inprocess, timeout_s=2.0)
    kinds = {r.rank: (r.error.kind if r.error else None) for r in results}
    assert kinds == {0: ErrorKind.WAITED, 1: ErrorKind.FAILED}, kinds
    assert results[0].error.type == "CollectiveTimeout"
    v = check(s, results)
    assert v.invariant == "error" and v.message.startswith("rank 1 failed after 2 ops"), v.message


def test_results_pickle_and_json_round_trip(inprocess_executor) -> None:
    s = load_scenario("prefetch_partial").with_(layout="2x2")
    results = inprocess_executor.run(s)
    assert all(isinstance(r, RankResult) for r in results)
    assert all(isinstance(d, Decision) for r in results for v in r.decisions.values() for d in v)
    again = [pickle.loads(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)) for r in results]
    assert again == results
    from_disk = [RankResult.from_json(json.loads(json.dumps(r.to_json()))) for r in results]
    assert from_disk == results
    # effects come back typed (the oracle reads their fields), by their decision's kind
    from reference.api import EFFECT_OF_KIND

    typed = [(d.kind, e) for r in from_disk for ch, v in r.decisions.items()
             for d, e in zip(v, r.effects.get(ch, ()), strict=False) if d.kind in EFFECT_OF_KIND]
    assert typed and all(type(e) is EFFECT_OF_KIND[k] for k, e in typed if e)
    assert check(s, from_disk).to_dict() == check(s, results).to_dict()


def test_from_json_reads_the_dict_results_of_older_commits(inprocess_executor) -> None:
    """The shape `execute` returned before records (lists by position, errors as text)."""
    s = load_scenario("write_acks").with_(layout="2x2")
    results = inprocess_executor.run(s)
    legacy = [{
        "rank": r.rank, "coords": list(r.coords),
        "decisions": {ch: [[d.kind, d.rid, list(d.local), list(d.agreed), d.outcome] for d in v]
                      for ch, v in r.decisions.items()},
        "effects": {ch: [list(e) for e in v] for ch, v in r.effects.items()},
        "actions": [[a.kind, a.rid, list(a.values)] for a in r.actions],
        "evictions": [[e.kind, int(e.busy)] for e in r.evictions], "digests": list(r.digests),
        "collectives": {g: [str(c) for c in v] for g, v in r.collectives.items()},
        "collective_order": {g: list(v) for g, v in r.collective_order.items()},
        "pending_collectives": {}, "storage": [[c.op, list(c.keys), list(c.ok),
                                                list(c.checksums)] for c in r.storage],
        "stored": list(r.stored), "outcomes": [{"rid": o.rid, "status": o.status,
                                                "device_hit": o.device_hit, "host_hit": o.host_hit,
                                                "computed": o.computed, "bad_pages": []}
                                               for o in r.outcomes],
        "snapshot": dataclasses.asdict(r.snapshot) if r.snapshot else {}, "error": None, "infrastructure": None, "ops_done": r.ops_done,
        "waiting_on": {}, "wall_s": r.wall_s,
    } for r in results]
    old = [RankResult.from_json(d) for d in legacy]
    assert [o.decisions for o in old] == [r.decisions for r in results]
    assert check(s, old).to_dict() == check(s, results).to_dict()
    broken = RankResult.from_json({**legacy[0], "error": "StorageError: master gone",
                                   "infrastructure": "storage backend 'mooncake' unavailable"})
    assert broken.error.kind is ErrorKind.INFRASTRUCTURE and broken.infrastructure


def test_storage_that_never_came_up_is_infrastructure(tmp_path) -> None:
    """A storage backend that cannot start is outside the SUT: the judge says `unknown`."""
    from scenarios.judge.judging import infrastructure

    s = load_scenario("write_acks").with_(backend="mooncake")
    env = rank_run.RunEnv(rank=0, run_id="rx", mooncake_master="127.0.0.1:1", agree_timeout_s=2.0)

    class _Solo:
        rank = 0

        def new_groups(self, rank_sets: Any, tag: str) -> list:
            return [None for _ in rank_sets]

    r = rank_run.execute(s, env, _Solo())
    assert r.error is not None and r.error.kind is ErrorKind.INFRASTRUCTURE, r.error
    assert "storage backend 'mooncake' unavailable" in (infrastructure([r]) or "")


def test_world_abort_stops_ranks_as_stopped() -> None:
    world = ThreadWorld(5.0)
    g = world.group((0, 1), "t")
    world.abort()
    with pytest.raises(RunAborted) as info:
        g.all_reduce(0, torch.zeros(1), "min")
    assert RankError.of(info.value).kind is ErrorKind.STOPPED


def run_failing_rank1(ctx: Any, payload: dict) -> RankResult:
    """Torchrun job: run_schedule, except that rank 1 raises at its third op (planted here,
    inside the worker, since a monkeypatch in the test process does not reach it)."""
    from scenarios.sut.reference_jobs import run_schedule

    apply = rank_run._apply
    seen = {"n": 0}

    def planted(sched: Any, op: Any) -> None:
        seen["n"] += 1
        if ctx.rank == 1 and seen["n"] == 3:
            raise RuntimeError("planted: Timed out, never joined")
        apply(sched, op)

    rank_run._apply = planted
    try:
        return run_schedule(ctx, payload)
    finally:
        rank_run._apply = apply


@pytest.mark.cp
def test_gloo_failures_are_typed_under_torchrun(torchrun_executor) -> None:
    """Real gloo: rank 0 times out in a collective rank 1 never enters. torch raises a bare
    RuntimeError; the recorder types it, so rank 0 WAITED and rank 1 (whose message has every
    waiting word) is the cause."""
    import uuid

    s = load_scenario("write_acks")
    pool = torchrun_executor.pool(s.layout)
    payload = {"schedule": s.model_dump_json(), "run_id": f"r{uuid.uuid4().hex[:10]}",
               "gated": True, "storage_root": torchrun_executor.storage_root,
               "mooncake_master": "", "collective_timeout_s": torchrun_executor.timeout_s}
    try:
        results = pool.run("tests.test_records:run_failing_rank1", payload, timeout_s=120)
    finally:  # its gloo groups saw a timeout: never reuse them
        pool.close()
        torchrun_executor._pools.pop(s.layout, None)
    assert [r.error.kind if r.error else None for r in results] == [ErrorKind.WAITED,
                                                                    ErrorKind.FAILED]
    assert results[0].error.type == "CollectiveError", results[0].error
    v = check(s, results)
    assert v.invariant == "error" and v.message.startswith("rank 1 failed"), v.message
