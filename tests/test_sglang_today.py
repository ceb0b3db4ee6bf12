"""Issue 21: the SGLang SUT drives the cache the release's server builds, and a harness
exception is never a verdict on the release.

Unit tests (always run): whose code raised (blame.py), the seam check (server_cache.py), the
rank boundary's classification of a planted harness exception, `--newest`. `sglang`-marked
tests drive built releases and skip, with the command that builds them, where they are not.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from scenarios.core.errors import CannotJudge, ErrorKind, MissingSeam
from scenarios.core.records import RankError, RankResult
from scenarios.generate.catalog import load_scenario
from scenarios.sut.sglang import blame, envs, server_cache
from tests.sglang_envs import need

NEWEST = "0.5.23"  # the newest release on the index when this was written (2026-12-07)


def _raise_in_harness() -> None:
    # a harness function that breaks: the innermost frame is in scenarios/
    server_cache.check_seams(SimpleNamespace(), "9.9.9", hit_queue=False, timeout_policy=False)


def _sglang_like() -> None:
    raise AttributeError("'Foo' object has no attribute 'bar'")  # raised in tests/, not scenarios/


def test_harness_origin_names_harness_code_only() -> None:
    with pytest.raises(MissingSeam) as harness:
        _raise_in_harness()
    at = blame.harness_origin(harness.value)
    assert at is not None and at.startswith("scenarios/sut/sglang/server_cache.py:") \
        and at.endswith("in check_seams"), at
    with pytest.raises(AttributeError) as other:
        _sglang_like()
    assert blame.harness_origin(other.value) is None
    # raised elsewhere, but from a harness exception (SGLang wrapping what our hook raised)
    try:
        try:
            _raise_in_harness()
        except CannotJudge as e:
            raise RuntimeError("wrapped by the system under test") from e
    except RuntimeError as wrapped:
        assert blame.harness_origin(wrapped) == at


def test_a_planted_harness_exception_is_unknown_not_a_divergence() -> None:
    """The rank boundary (rank._machine_broke): an AttributeError raised in harness code, as
    GatedMooncakeStore's `extra_backend_tag` read on 0.5.17+ was, is an infrastructure error
    (verdict unknown, 125); the same exception raised outside the harness stays a failure of
    the system under test (a divergence [error]). Fails without blame.py: both were FAILED."""
    from scenarios.judge.judging import infrastructure
    from scenarios.sut.sglang import rank
    from scenarios.sut.sglang.executor import verdict_of

    def planted() -> None:  # a plain bug in a harness seam: TypeError in adapters.py
        from scenarios.sut.sglang import adapters

        adapters.token_ids(None)

    s = load_scenario("write_acks").with_(layout="1x2")
    for fn, harness in ((planted, True), (_raise_in_harness, True), (_sglang_like, False)):
        try:
            fn()
        except Exception as e:
            where = rank._machine_broke(e)
            err = RankError.of(e, ErrorKind.INFRASTRUCTURE if where else None, where or "")
        results = [RankResult(rank=r, error=err if r == 0 else None) for r in (0, 1)]
        v = verdict_of(s, results, True)
        if harness:
            assert infrastructure(results) and v.status == "unknown" and v.exit_code == 125
            assert ("harness error (not SGLang's) raised at scenarios/sut/sglang/adapters.py"
                    if fn is planted else "driving this SGLang release") in v.diagnosis, \
                v.diagnosis
        else:
            assert v.status == "diverge" and v.invariant == "error", v.summary()


def test_a_thread_dying_in_harness_code_is_blamed_on_the_harness() -> None:
    """An IO thread of SGLang's that dies in harness code (the Mooncake crash: a seam read an
    attribute 0.5.17 dropped) is found by the thread hook through blame.harness_origin."""
    import threading

    died: list[BaseException] = []
    old = threading.excepthook
    threading.excepthook = lambda a: died.append(a.exc_value)
    try:
        t = threading.Thread(target=_raise_in_harness)
        t.start()
        t.join()
    finally:
        threading.excepthook = old
    assert died and blame.harness_origin(died[0]) is not None


def test_missing_seams_are_named_with_the_class() -> None:
    class UnifiedRadixCache:  # a class with only some of the seams
        writing_check = loading_check = cache_controller = None

    cache = UnifiedRadixCache()
    missing = server_cache.missing_seams(cache, hit_queue=True, timeout_policy=True)
    assert "writing_check" not in missing and "_insert_helper_host" in missing
    assert "_revoke_pending_prefetch" in missing and "is_prefetch_timeout" in missing
    with pytest.raises(MissingSeam, match="builds UnifiedRadixCache, which lacks "
                       r"the seam\(s\) .*can_terminate_prefetch") as e:
        server_cache.check_seams(cache, "0.5.20", hit_queue=False, timeout_policy=False)
    assert e.value.exit_code == 125
    full = SimpleNamespace(**{n: None for n in server_cache.SEAMS})
    server_cache.check_seams(full, "0.5.11", hit_queue=False, timeout_policy=False)  # no raise


def test_newest_release_is_the_last_on_the_index(monkeypatch) -> None:
    out = "sglang (0.5.23)\nAvailable versions: 0.5.23, 0.5.22, 0.5.9, 0.5.8, 0.5.10.post1\n"
    monkeypatch.setattr(envs, "_pip", lambda *a, **k: SimpleNamespace(stdout=out, stderr=""))
    assert envs.releases_in_range() == ["0.5.9", "0.5.10.post1", "0.5.22", "0.5.23"]
    assert envs.newest_release() == "0.5.23"


def _run(version: str, layout: str, capsys, **extra: str) -> dict:
    import json

    from scenarios.cli.main import main

    rc = main(["run", "write_acks", "--sut", f"sglang=={version}", "--layout", layout,
               "--json", *[a for k, v in extra.items() for a in (f"--{k}", v)]])
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["exit_code"] == rc
    return d


@pytest.mark.sglang
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["1x2", pytest.param("2x2", marks=pytest.mark.soak)])
def test_0_5_20_judges_the_class_its_server_builds(layout, capsys) -> None:
    """0.5.20's server builds UnifiedRadixCache (registry.py): the run builds it through the
    release's own factory and judges it (0 or 1, never 125), naming the class."""
    need("0.5.20")
    d = _run("0.5.20", layout, capsys)
    assert d["exit_code"] in (0, 1), d
    assert "(UnifiedRadixCache)" in d["message"], d


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_0_5_20_on_mooncake_judges(capsys) -> None:
    """0.5.17+ fold Mooncake's backend tag into a config prefix with the model name: the
    harness's key names follow it and every rank shares one model path (it crashed on
    `extra_backend_tag`, reported as DIVERGE [error], before)."""
    need("0.5.20")
    d = _run("0.5.20", "1x2", capsys, backend="mooncake")
    assert d["exit_code"] == 0 and "(UnifiedRadixCache)" in d["message"], d


@pytest.mark.sglang
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["1x2", pytest.param("2x2", marks=pytest.mark.soak)])
def test_newest_release_is_judged_through_its_rust_tree_core(layout, capsys) -> None:
    """The newest release is not refused by a version check: it builds what its server builds
    (UnifiedRadixCache on the Rust tree core, which cannot be walked: `root_node` raises
    NotImplementedError) and is judged, 0 or 1, never 125: the tree digest comes from the
    core's own KV cache events (tree_view.py). Answered 125 naming `root_node` before."""
    need(NEWEST)
    d = _run(NEWEST, layout, capsys)
    assert d["exit_code"] in (0, 1) and "(UnifiedRadixCache)" in d["message"], d
    assert d["status"] == "agree" or d["invariant"] != "error", d


@pytest.mark.sglang
@pytest.mark.soak
@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", ["0.5.21", "0.5.22"])
def test_rust_tree_core_releases_are_judged(version, capsys) -> None:
    """0.5.21 and 0.5.22 build UnifiedRadixCache on the Rust tree core too (nightly)."""
    need(version)
    d = _run(version, "1x2", capsys)
    assert d["exit_code"] in (0, 1) and "(UnifiedRadixCache)" in d["message"], d


def test_a_call_into_a_harness_override_with_a_changed_signature_is_the_harness() -> None:
    """0.5.20's controller calls `_put_batch_zero_copy_impl` with one more argument than our
    override took: the TypeError is raised in SGLang's frame, yet the fault is the harness's
    (it read as DIVERGE [error] before). A bad call aimed at SGLang's own code is not."""
    from scenarios.sut.sglang import adapters

    with pytest.raises(TypeError) as ours:
        adapters.evict(object())  # type: ignore[call-arg]  (the call fails in this frame)
    at = blame.harness_origin(ours.value)
    assert at is not None and at.startswith("scenarios/sut/sglang/adapters.py:") and "evict" in at

    def outside(a: int) -> None:
        pass
    with pytest.raises(TypeError) as theirs:
        outside()  # type: ignore[call-arg]
    assert blame.harness_origin(theirs.value) is None


def test_sglang_reading_a_field_a_harness_stand_in_lacks_is_the_harness() -> None:
    """0.5.20's load-back read `req.kv` of the driver's request stand-in: an AttributeError
    raised in SGLang's frame, about an object of ours (it read as DIVERGE [error])."""
    from scenarios.sut.sglang.adapters import RequestStandIn

    def sglang_reads(req: object) -> object:  # stands in for SGLang's code (not in scenarios/)
        return req.kv  # type: ignore[attr-defined]
    with pytest.raises(AttributeError) as ours:
        sglang_reads(RequestStandIn(rid="r"))
    at = blame.harness_origin(ours.value)
    assert at is not None and "RequestStandIn" in at and "'kv'" in at, at
    with pytest.raises(AttributeError) as theirs:
        sglang_reads(SimpleNamespace(rid="r"))  # not one of ours: SGLang's own bug
    assert blame.harness_origin(theirs.value) is None


def test_a_compile_lock_a_killed_process_left_is_cleared(tmp_path, monkeypatch) -> None:
    """torch's FileBaton waits for ever on a lock a process killed mid-compile left (seen: a
    0.5.20 run stalled to 125 on one); a fresh lock (a compile running now) is kept."""
    import os
    import time

    from scenarios.sut.sglang import envs

    monkeypatch.setattr(envs, "release_dir", lambda v, root=None: tmp_path / v)
    ext = Path(envs.torch_extensions_dir("0.5.20"))
    assert ext.parent.name == ".torch_extensions" and ext.name  # one folder per checkout
    stale, fresh = ext / "hicache_hash_cpp" / "lock", ext / "other" / "lock"
    for p in (stale, fresh):
        p.parent.mkdir(parents=True)
        p.write_text("")
    old = time.time() - envs.STALE_COMPILE_LOCK_S - 5
    os.utime(stale, (old, old))
    assert envs.clear_stale_compile_locks("0.5.20") == [str(stale)]
    assert not stale.exists() and fresh.exists()


def test_the_timeout_seam_is_found_under_each_unified_name() -> None:
    """The timeout stop policy's clock: `_prefetch_timeout_check_linear_func` (0.5.19, 0.5.20),
    `_prefetch_deadline_expired` (0.5.21+; every generated timeout Schedule on 0.5.23 was 125
    naming the first before)."""
    for name in ("_prefetch_timeout_check_linear_func", "_prefetch_deadline_expired"):
        cache = SimpleNamespace(tree_core=None, **{name: lambda op: False})
        assert server_cache.alias(cache, "is_prefetch_timeout") == name
        missing = server_cache.missing_seams(cache, hit_queue=True, timeout_policy=True)
        assert name not in missing and not any("timeout" in m for m in missing), missing
    bare = SimpleNamespace(tree_core=None)
    assert "_prefetch_deadline_expired" in server_cache.missing_seams(
        bare, hit_queue=True, timeout_policy=True)


def test_the_per_batch_ack_seam_is_needed_only_where_the_controller_agrees_per_batch() -> None:
    """0.5.16 .. 0.5.18's hit-queue HiRadixCache has no `_handle_prefetch_result` (0.5.19 added
    it with the per-batch acks, `prefetch_sync_queue`): asking for it there made every run on
    those three releases 125."""
    from queue import Queue

    def cache(per_batch: bool) -> SimpleNamespace:
        cc = SimpleNamespace(prefetch_hit_queue=Queue(), **(
            {"prefetch_sync_queue": Queue()} if per_batch else {}))
        seams = {n: None for n in server_cache.SEAMS + server_cache.HIT_QUEUE_SEAMS}
        return SimpleNamespace(**{**seams, "cache_controller": cc})

    assert server_cache.missing_seams(cache(False), hit_queue=True, timeout_policy=False) == []
    assert server_cache.missing_seams(cache(True), hit_queue=True, timeout_policy=False) == [
        "_handle_prefetch_result"]
