"""Pipeline parallelism and MLA on the SGLang SUT (scenarios/sut/sglang/pools.py, rank.py).

Unit tests (always run): the key naming the file backend's records use is SGLang's (as the
reference has it) for MHA / MLA with and without PP, and 0.5.13's PP forward (stage 0's
`isend`, a later stage's `recv`) is logged alike on both ends.
`sglang`-marked: an MLA run on 0.5.11 builds the MLA pools (keys `{hash}__k`, only storage TP
rank 0 backs up); the PP runs (soak: two pool starts) see 0.5.11's stages ack writes on their
own and 0.5.13's stage 0 decide and forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from reference.api import KeySuffix
from scenarios.sut.sglang import pools
from tests.sglang_envs import POST, need, started


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize(("pp_rank", "pp_size"), [(0, 1), (0, 2), (1, 2), (2, 3)])
@pytest.mark.parametrize("tp_rank", [0, 1, 3])
def test_key_tail_is_sglangs_naming(mla: bool, pp_rank: int, pp_size: int, tp_rank: int) -> None:
    config = SimpleNamespace(tp_rank=tp_rank, pp_rank=pp_rank, pp_size=pp_size,
                             is_mla_model=mla)
    tail, parts = pools.key_tail(config)
    assert parts == (("k",) if mla else ("k", "v"))
    want = KeySuffix(tp_rank, pp_rank=pp_rank, pp_size=pp_size, is_mla=mla)
    for part in parts:
        assert f"{tail}_{part}" == want.tail(part)


def test_pp_forward_is_logged_alike_on_both_ends(monkeypatch) -> None:
    """Stage 0 `isend`s (group_dst), stage 1 `recv`s (group_src): both log one forward from
    global rank 0; a middle stage's pass-on `isend` is not logged (the reference's forward is
    one call per rank)."""
    from scenarios.sut.sglang import rank

    t = torch.zeros(1, dtype=torch.int32)
    monkeypatch.setattr(rank.dist, "get_process_group_ranks", lambda g: [0, 4, 8])
    calls = {}
    for me, kind, kw in ((0, "isend", {"group_dst": 1}), (4, "recv", {"group_src": 0}),
                         (4, "isend", {"group_dst": 2}), (8, "recv", {"group_src": 1})):
        monkeypatch.setattr(rank.dist, "get_rank", lambda me=me: me)
        calls[(me, kind)] = rank._pp_forward_call(kind, (t,), {"group": object(), **kw}, None)
    assert calls[(0, "isend")] == calls[(4, "recv")]
    assert calls[(0, "isend")].op == "forward" and calls[(0, "isend")].src == 0
    assert calls[(4, "isend")] is None
    assert calls[(8, "recv")].src == 4


@pytest.fixture(scope="module")
def post():
    yield from started(POST)


@pytest.mark.sglang
@pytest.mark.timeout(600)
def test_mla_run_builds_the_mla_pools(post) -> None:
    """write_acks with an MLA model on 1x2 without DP attention (key TP ranks 0 and 1): every
    key is `{hash}__k` (the storage config saw an MLA device pool), rank 1 backs nothing up
    (SGLang's backup_skip), rank 0 does, and the run agrees."""
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.checker import check
    from scenarios.sut.sglang.executor import verdict_of

    s = load_scenario("write_acks").with_(layout="1x2", backend="file", dp_attention=False)
    s = s.model_copy(update={"cache": s.cache.model_copy(update={"mla": True})})
    results = post[POST].run(s, False)
    assert all(r.error is None for r in results), [r.error for r in results]
    keys = {r.rank: [(c.op, k) for c in r.storage for k in c.keys] for r in results}
    assert keys[0] and all(k.endswith("__k") for r in keys.values() for _, k in r), keys
    assert any(op == "set" for op, _ in keys[0])
    assert not any(op == "set" for op, _ in keys[1])
    assert check(s, results).ok
    assert verdict_of(s, results, False).ok


def _pp_run(version: str) -> tuple:
    from scenarios.generate.catalog import load_scenario
    from scenarios.sut.sglang.executor import SglangExecutor, verdict_of

    need(version)
    s = load_scenario("write_acks").with_(layout="1x1x2", backend="file",
                                          sut=f"sglang=={version}")
    with SglangExecutor(version, timeout_s=20, build=False) as ex:
        results = ex.run(s, True)
    return s, results, verdict_of(s, results, True)


@pytest.mark.sglang
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_pp_stages_ack_on_their_own_before_0_5_13() -> None:
    """0.5.11 reduces inside each stage only: stage 1's writes finish later and it acks fewer
    than stage 0 (the reference's sglang-0.5.11 profile says the same); keys carry the PP
    rank (`{hash}_{tp}_{pp}_k`)."""
    s, results, v = _pp_run("0.5.11")
    assert v.invariant == "decisions", v.summary()
    assert not any(name.startswith("pp[") for r in results for name in r.collectives)
    for r in results:
        sets = [k for c in r.storage if c.op == "set" for k in c.keys]
        assert sets and all(k.endswith((f"_0_{r.rank}_k", f"_0_{r.rank}_v")) for k in sets)


@pytest.mark.sglang
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_pp_stage_0_decides_and_forwards_from_0_5_13() -> None:
    """0.5.13: stage 0 decides the write / load acks and forwards them (`_pp_sync`): the run
    agrees, and both stages log the same forwards on the PP group."""
    s, results, v = _pp_run("0.5.13")
    assert v.ok, v.summary()
    fw = [r.collectives.get("pp[0, 1]", ()) for r in results]
    assert fw[0] and fw[0] == fw[1] and all(c.op == "forward" for c in fw[0])


def test_a_later_stage_short_of_the_forwarded_counts_is_unknown_not_a_hang() -> None:
    """0.5.20+ PP drain: a later stage whose queue holds fewer items than stage 0's forwarded
    count raises CannotJudge (125) naming it, instead of blocking in Queue.get(); stage 0, a
    stage whose queues are full and PP 1 go on."""
    from queue import Queue

    from scenarios.core.errors import CannotJudge
    from scenarios.sut.sglang import pp_drain

    q: Queue = Queue()
    q.put(1)
    cc = SimpleNamespace(ack_backup_queue=q)
    counts = {"n_backup": ("ack_backup_queue", 2)}
    with pytest.raises(CannotJudge, match="ack_backup_queue has 1 of 2"):
        pp_drain.wait_for_forwarded_counts(SimpleNamespace(pp_rank=1, pp_size=2), cc, counts,
                                           wait_s=0.05)
    pp_drain.wait_for_forwarded_counts(SimpleNamespace(pp_rank=0, pp_size=2), cc, counts,
                                       wait_s=0.05)
    pp_drain.wait_for_forwarded_counts(SimpleNamespace(pp_rank=0, pp_size=1), cc, counts,
                                       wait_s=0.05)
    q.put(2)
    pp_drain.wait_for_forwarded_counts(SimpleNamespace(pp_rank=1, pp_size=2), cc, counts,
                                       wait_s=0.05)


def test_a_later_stage_opens_the_gates_of_the_io_its_drain_waits_for() -> None:
    """The item a later stage's drain waits for sits behind a gate of the stream that fills its
    queue (the backup's `set`): that gate opens, one unit at a time, until the count is there;
    a stream whose thread is not at its gate, or one that fills another queue, stays shut."""
    from collections import defaultdict
    from queue import Queue

    from scenarios.sut.sglang import pp_drain

    backups: Queue = Queue()

    class Gates:
        def __init__(self) -> None:
            self.at_gate: dict[str, bool] = defaultdict(bool, {"set": True, "get": True})
            self.opened: list[str] = []

        def open_one(self, stream: str) -> None:
            self.opened.append(stream)
            if stream == "set":
                backups.put(len(self.opened))

    gates, opened = Gates(), []
    cc = SimpleNamespace(ack_backup_queue=backups, ack_prefetch_queue=Queue())
    counts = {"n_backup": ("ack_backup_queue", 2), "n_ack_prefetch": ("ack_prefetch_queue", 0)}
    pp_drain.wait_for_forwarded_counts(SimpleNamespace(pp_rank=1, pp_size=2), cc, counts, gates,
                                       opened, wait_s=5)
    assert gates.opened == opened == ["set", "set"] and backups.qsize() == 2
    gates.at_gate["set"] = False  # the thread is busy elsewhere: nothing to open, so 125
    with pytest.raises(pp_drain.CannotJudge, match="ack_backup_queue has 2 of 3"):
        pp_drain.wait_for_forwarded_counts(
            SimpleNamespace(pp_rank=1, pp_size=2), cc, {"n_backup": ("ack_backup_queue", 3)},
            gates, opened, wait_s=0.05)
    assert gates.opened == ["set", "set"]


@pytest.mark.sglang
@pytest.mark.soak
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("version", "name"), [
    ("0.5.20", "unknown-sglang-0.5.20-dpattn-1x1x2-c14c0c9783ad.json"),
    ("0.5.23", "unknown-sglang-0.5.23-dpattn-1x1x2-6feb98d55141.json")])
def test_a_pp_drain_waiting_on_gated_io_is_judged(version: str, name: str) -> None:
    """The matrix's two unjudged PP Schedules (a later stage's drain waited for a backup held
    at the harness's gate: 125 before pp_drain opened the awaited gates) are judged: both
    stages agree."""
    from scenarios.judge.checker import check
    from scenarios.store.replay import read_replay
    from scenarios.sut.sglang.executor import SglangExecutor, verdict_of
    from tests.subprocess_env import REPO

    need(version)
    s, _ = read_replay(REPO / "docs" / "sglang-matrix" / name)
    s = s.with_(sut=f"sglang=={version}")
    with SglangExecutor(version, timeout_s=30, build=False) as ex:
        results = ex.run(s, s.dp_attention)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert check(s, results).ok and verdict_of(s, results, s.dp_attention).ok


@pytest.mark.sglang
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_0_5_19_under_pp_counts_stage_0s_acks_where_the_release_does() -> None:
    """0.5.19's UnifiedRadixCache under PP counts stage 0's ready acks itself
    (`_count_ready_acks`, then one MIN and `writing_check(finish_count=...)`) instead of
    `_sync_hicache_ready_counts`: the driver's hooks read the count there (a KeyError in the
    harness, 125 on every PP run of 0.5.19, before). The stages agree on write_acks."""
    s, results, v = _pp_run("0.5.19")
    assert all(r.error is None for r in results), [r.error for r in results]
    assert v.ok, v.summary()
    acks = [[d.local for d in r.decisions["scheduler"] if d.kind == "writing_check"]
            for r in results]
    assert acks[0] and all(loc != (None,) for loc in acks[0])  # stage 0 counted
    assert all(loc == (None,) for loc in acks[1])  # stage 1 takes stage 0's count
