"""SGLang 0.5.16 .. 0.5.20 (the hit-queue prefetch pipeline, scenarios/sut/sglang/hitqueue.py).

Unit tests (always run): which reference profile models each release, and that the oracle
judges 0.5.19+'s one-value termination agreement (logged as [1 - stop, stop]).
`sglang`-marked tests drive the real 0.5.20 and are skipped, with the command that builds it,
when its environment is not built here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.core.releases import profile_for
from tests.sglang_envs import driving_hiradix_cache, need, started

#: these tests pin down 0.5.20's HiRadixCache (the hit-queue pipeline as 0.5.16 .. 0.5.18
#: servers build it), not the UnifiedRadixCache 0.5.20's own server builds
_hiradix_cache = pytest.fixture(autouse=True, scope="module")(driving_hiradix_cache)

ROOT = Path(__file__).parent.parent
CORPUS_FILE = ROOT / "scenarios" / "corpus" / "sglang" / \
    "replay-sglang-0.5.10.post1-dpattn-1x2-c9b8328630d0.json"
V = "0.5.20"


def test_profiles_of_the_hit_queue_releases() -> None:
    """0.5.14 .. 0.5.18 agree on progress once at termination and reduce in every
    writing_check (0.5.14's protocol; 0.5.16's hit queue is not in a profile); 0.5.19 brings
    the prefetch-sync thread's per-batch acks (0.5.20's)."""
    assert profile_for("0.5.13.post1") == "sglang-0.5.13"
    assert [profile_for(v) for v in ("0.5.14", "0.5.15.post1", "0.5.16", "0.5.17", "0.5.18")] \
        == ["sglang-0.5.14"] * 5
    assert profile_for("0.5.19") == profile_for("0.5.20") == "sglang-0.5.20"


def _terminate_results(outcomes: tuple[str, str], agreed_stop: int) -> list:
    """wait_complete on 0.5.19+: logged [1 - can, stop] with can = 0 (hitqueue.py)."""
    from scenarios.core.records import Decision, RankResult

    return [RankResult(rank=r, decisions={"scheduler": (
                Decision("can_terminate", "a", (1, local_stop), (1, agreed_stop), outcome),)})
            for r, (local_stop, outcome) in enumerate(zip((1, 0), outcomes, strict=True))]


def test_oracle_judges_the_one_value_termination_of_0_5_19() -> None:
    """Rank 0 wants to stop (its op terminated), rank 1 does not: the MAX says stop, so both
    must terminate. A rank that waits, or an agreed value that is not the MAX, is a
    violation."""
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.oracle import check_oracle

    s = load_scenario("prefetch_batches").with_(layout="1x2", sut="sglang==0.5.20")
    assert check_oracle(s, _terminate_results(("terminate", "terminate"), 1)) == []
    bad = check_oracle(s, _terminate_results(("terminate", "wait"), 1))
    assert [rule for rule, _ in bad] == ["terminate"]
    wrong_op = check_oracle(s, _terminate_results(("wait", "wait"), 0))  # a MIN, not a MAX
    assert wrong_op and wrong_op[0][0] == "reduce"


@pytest.fixture(scope="module")
def ex():
    for exs in started(V):  # one executor, closed after the module
        yield exs[V]


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_corpus_counterexample_agrees_on_0_5_20(ex) -> None:
    """The pre-fix counterexample (a prefetch whose first read fails on one CP peer) agrees on
    0.5.20: its hit query and scheduler agreements reduce over the attention-CP group."""
    from scenarios.store.replay import read_replay

    s, data = read_replay(CORPUS_FILE)
    s = s.with_(sut=f"sglang=={V}")
    results = ex.run(s, True)
    from scenarios.judge.checker import check

    v = check(s, results)
    assert v.ok, v.summary()
    assert not any(r.error for r in results)
    cp = [name for name in results[0].collectives if name.startswith("attn_cp")]
    assert cp and results[0].collectives[cp[0]] == results[1].collectives[cp[0]]
    # the hit-queue drain: [hit, ack_prefetch, backup, release], agreed by one MIN per step
    drains = [d for d in results[0].decisions["scheduler"] if d.kind == "drain"]
    assert drains and all(len(d.agreed) == 4 for d in drains)


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_write_acks_agree_on_0_5_20(ex) -> None:
    """The catalog's write-ack interleaving on CP=2 with DP attention: one MIN of the ready
    counts per step over the attention-CP group, so both peers ack the same writes."""
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.checker import check

    s = load_scenario("write_acks").with_(layout="1x2", sut=f"sglang=={V}")
    results = ex.run(s, True)
    v = check(s, results)
    assert v.ok, v.summary()
    acks = [[d.agreed for d in r.decisions["scheduler"] if d.kind == "writing_check"]
            for r in results]
    assert acks[0] == acks[1] and any(a != (0,) for a in acks[0])
    assert results[0].collectives == results[1].collectives


FETCH_BACK = """
name = "fetch_back"
layout = "1x2"
[cache]
prefetch_stop_policy = "wait_complete"
[[ops]]
kind = "add"
rid = "warm"
shared = 0
shared_len = 24
own_len = 3
""" + '[[ops]]\nkind = "step"\n' * 5 + """
[[ops]]
kind = "evict_device"
n = 1000
[[ops]]
kind = "evict_host"
n = 1000
[[ops]]
kind = "add"
rid = "fetch"
shared = 0
shared_len = 24
own_len = 5
""" + '[[ops]]\nkind = "step"\n' * 4


def _run_agreeing(ex, tmp_path, name: str, toml: str) -> list:  # noqa: ANN001
    """Run a hand-written Schedule on V; it must agree. Returns the per-rank results."""
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.checker import check

    f = tmp_path / f"{name}.toml"
    f.write_text(toml)
    s = load_scenario(str(f)).with_(sut=f"sglang=={V}")
    results = ex.run(s, True)
    v = check(s, results)
    assert v.ok, v.summary()
    return results


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_stored_prefix_comes_back_through_per_batch_acks(ex, tmp_path) -> None:
    """A prefix written through to storage, evicted from device and host, is prefetched back:
    the hit query finds its 6 pages, the scheduler allocates host pages at the drain, the IO
    thread reads them, the sync thread agrees the progress ack (MIN), and the request loads
    24 tokens back from host with the bytes each rank wrote."""
    results = _run_agreeing(ex, tmp_path, "fetch_back", FETCH_BACK)
    for r in results:
        progress = r.decisions.get("prefetch_sync", ())
        assert [(d.kind, d.rid, d.local, d.agreed, d.outcome) for d in progress] == \
            [("prefetch_progress", "fetch", (24,), (24,), "24 tokens")]
        done = [d for d in r.decisions["scheduler"] if d.kind == "prefetch_done"
                and d.rid == "fetch"]
        assert done and done[-1].agreed == (24,)
        fetch = next(o for o in r.outcomes if o.rid == "fetch")
        assert fetch.host_hit == 24 and fetch.bad_pages == ()
        assert any(c.op == "get" and sum(c.ok) == 12 for c in r.storage)


@pytest.mark.sglang
@pytest.mark.soak  # the CLI's own pool start; the same file runs in the shared pool above
@pytest.mark.timeout(900)
def test_replay_exit_code_on_0_5_20() -> None:
    """0.5.20 is judged (0) where it used to answer "cannot run here"; a release older than
    the harness drives still does (there is no newest: issue 21)."""
    from scenarios.cli.main import main

    need(V)
    assert main(["replay", str(CORPUS_FILE), "--sut", f"sglang=={V}"]) == 0
    assert main(["replay", str(CORPUS_FILE), "--sut", "sglang==0.5.8"]) == 125


def test_a_new_group_is_named_afresh_when_it_reuses_an_id(monkeypatch) -> None:
    """SGLang builds fresh gloo groups per cache (per run); a new group object can reuse a
    collected one's id. Its recorded name must be the new one, or ranks whose ids were reused
    differently log the same collective under different group names (a false divergence)."""
    import torch.distributed as dist

    from scenarios.sut.sglang import rank

    for kind in ("all_reduce", "barrier", "all_gather_object", "broadcast", "all_gather",
                 "send", "recv"):
        monkeypatch.setattr(dist, kind, getattr(dist, kind))  # restored after the test
    reused = object()
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: reused)
    monkeypatch.setattr(rank, "_GROUP_NAMES", {})
    rank._install_recorders()
    dist.new_group(ranks=[0, 2])
    first = rank._GROUP_NAMES[id(reused)]
    dist.new_group(ranks=[1, 3])
    assert first.endswith("_[0, 2]")
    assert rank._GROUP_NAMES[id(reused)].endswith("_[1, 3]")


REISSUE = """
name = "reissue"
layout = "1x2"
[cache]
prefetch_stop_policy = "best_effort"
write_policy = "write_through_selective"
[[ops]]
kind = "add"
rid = "a"
shared = 0
shared_len = 16
own_len = 0
prefetch = false
""" + '[[ops]]\nkind = "step"\n' * 2 + """
[[ops]]
kind = "add"
rid = "b"
shared = 0
shared_len = 16
own_len = 12
[[ops]]
kind = "evict_device"
n = 1000
""" + '[[ops]]\nkind = "step"\n' * 3


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_storage_lookup_reissued_after_device_hit_loss_on_0_5_20(ex, tmp_path) -> None:
    """0.5.20's scheduler looks storage up again for a request whose match shrank while it
    waited: b's 16 device tokens (not backed up under write_through_selective) are evicted
    while it waits, so at admission it re-queries all 7 pages, on every rank alike."""
    results = _run_agreeing(ex, tmp_path, "reissue", REISSUE)
    for r in results:
        exists = [len(c.keys) for c in r.storage if c.op == "exists"]
        assert exists == [6, 14]  # 3 pages after the device hit, then all 7 (k and v each)
