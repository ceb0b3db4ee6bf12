"""Every collective-issuing function of a release, and the ops that reach it.

The extractor (scenarios/sut/sglang/collective_paths.py) is checked on small sources
everywhere; the committed tables (docs/sglang-collective-paths.md) are regenerated from each
built release's own source and the committed observations, and compared. A release that is not
built here skips with the command that builds it (never counted as a pass). The observations
themselves come from SGLang runs (`--trace`, minutes per release): not rerun here.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from scenarios.store.doc_tables import read_block
from scenarios.sut.sglang import call_log, path_trace
from scenarios.sut.sglang import collective_paths as cp
from tests.sglang_envs import need
from tests.subprocess_env import REPO

DOC, OBSERVED = REPO / cp.DOC, REPO / cp.OBSERVED

CACHE = textwrap.dedent('''
    import torch
    import torch.distributed as dist
    from torch.distributed import barrier

    class HiRadixCache:
        def _all_reduce_attn_groups(self, tensor, op):
            for group in self.groups:
                torch.distributed.all_reduce(tensor, op=op, group=group)

        def writing_check(self):
            self._all_reduce_attn_groups(torch.tensor([1]), None)

        def check_hicache_events(self):
            self.writing_check()
            self.cache_controller.sync_hits()

        @rank_consensus(same_params=["params.host_hit_length"])
        def init_load_back(self, params):
            return params

        def match_prefix(self, key):
            self.socket.send(key)           # zmq: not a collective
            return self.kv.scatter(0, key)  # a tensor's scatter: not one either

        def abort(self):
            barrier(group=self.tp_group)

        def p2p(self, t):
            dist.send(t, dst=1)

    class Child(HiRadixCache):
        def step(self):
            self.check_hicache_events()
    ''')
CONTROLLER = textwrap.dedent('''
    class HiCacheController:
        def sync_hits(self):
            self.tp_group.all_gather_object([], 1)

        def idle(self):
            self.queue.put(1)
    ''')


def _issuers(cache: str = CACHE) -> dict[str, cp.Issuer]:
    found = cp.issuers_in({"mem_cache/hiradix_cache.py": cache, cp.CONTROLLER_FILE: CONTROLLER})
    return {i.qualname: i for i in found}


def test_direct_wrapped_inherited_and_decorated_collectives_are_found() -> None:
    got = _issuers()
    assert set(got) == {
        "HiRadixCache._all_reduce_attn_groups", "HiRadixCache.writing_check",
        "HiRadixCache.check_hicache_events", "HiRadixCache.init_load_back",
        "HiRadixCache.abort", "HiRadixCache.p2p", "Child.step",
        "HiCacheController.sync_hits"}
    assert got["HiRadixCache._all_reduce_attn_groups"].issues == ("all_reduce",)
    assert got["HiRadixCache.writing_check"].issues == ("via _all_reduce_attn_groups",)
    assert got["HiRadixCache.check_hicache_events"].issues == ("via sync_hits",
                                                               "via writing_check")
    assert got["Child.step"].issues == ("via check_hicache_events",)  # through the base class
    assert got["HiRadixCache.init_load_back"].checker_only  # @rank_consensus only
    assert not got["HiRadixCache.writing_check"].checker_only
    assert got["HiRadixCache.abort"].issues == ("barrier",)
    assert got["HiRadixCache.p2p"].issues == ("send",)
    assert got["HiRadixCache.writing_check"].line == 11


def test_a_wrapper_without_its_collective_takes_its_callers_off_the_list() -> None:
    """The planted bug: the wrapper's all_reduce removed; nothing that only reached the
    collective through it is listed any more (the fixed point follows calls, not names)."""
    broken = CACHE.replace("torch.distributed.all_reduce(tensor, op=op, group=group)", "pass")
    got = _issuers(broken)
    assert "HiRadixCache._all_reduce_attn_groups" not in got
    assert "HiRadixCache.writing_check" not in got
    assert got["HiRadixCache.check_hicache_events"].issues == ("via sync_hits",)


def test_unreached_functions_say_why() -> None:
    i = _issuers()
    assert "SGLANG_ENABLE_RANK_CONSENSUS_CHECKER" in cp.why_unreached(
        i["HiRadixCache.init_load_back"], "HiRadixCache")
    assert "builds UnifiedRadixCache" in cp.why_unreached(
        i["HiRadixCache.writing_check"], "UnifiedRadixCache")
    mamba = cp.Issuer("mem_cache/hi_mamba_radix_cache.py", "HiMambaRadixCache.evict", 1,
                      ("all_reduce",))
    assert "hybrid SSM" in cp.why_unreached(mamba, "HiRadixCache")


def test_render_marks_reached_and_unreached_and_extractor_gaps() -> None:
    issuers = list(_issuers().values())
    observed = {"functions": {"mem_cache/hiradix_cache.py:HiRadixCache.writing_check": ["step"]},
                "issued_in": ["mem_cache/hiradix_cache.py:HiRadixCache.hidden"],
                "runs": [["write_acks", "AGREE: 2 ranks agree on 3 decisions (HiRadixCache)"]]}
    text = cp.render("9.9", issuers, observed)
    assert "drove `HiRadixCache`" in text and "1 reached by 1 traced Schedules" in text
    assert "| `HiRadixCache.writing_check` |" in text and "| `step` |" in text
    assert "not reached: issues only through `@rank_consensus`" in text
    assert "`mem_cache/hiradix_cache.py:HiRadixCache.hidden`" in text  # seen, not found


# -- the committed tables ------------------------------------------------------------------------
VERSIONS = sorted(json.loads(OBSERVED.read_text()))


@pytest.mark.parametrize("version", VERSIONS)
def test_committed_table_is_the_release_source_and_observations_rendered(version: str) -> None:
    need(version)
    want = cp.release_block(version, cp.load_observed(OBSERVED))
    assert want is not None
    assert read_block(DOC.read_text(), cp.block_name(version)) == want, (
        f"regenerate: python -m scenarios.sut.sglang.collective_paths {version} "
        f"--write {cp.DOC}")


def test_every_traced_release_has_its_table_and_runs() -> None:
    observed = cp.load_observed(OBSERVED)
    assert {"0.5.13", "0.5.20"} <= set(observed)
    for version, seen in observed.items():
        read_block(DOC.read_text(), cp.block_name(version))  # raises when absent
        names = {name for name, _ in seen["runs"]}
        assert "decode_restore" in names and "write_acks" in names
    # the decode side is reached where the release has it, with its own op
    key = "disaggregation/decode_hicache_mixin.py:DecodeHiCacheTransferMixin." \
          "_process_hicache_local_restores"
    assert observed["0.5.13"]["functions"][key] == ["step"]


# -- the trace and the call log ------------------------------------------------------------------
def test_frames_name_sglang_functions_outer_for_nested_and_the_wrapped_one(tmp_path: Path) -> None:
    mod = tmp_path / "sglang" / "srt" / "mem_cache" / "fake.py"
    mod.parent.mkdir(parents=True)
    mod.write_text(textwrap.dedent('''
        import sys

        def deco(func):
            def wrapper(*a):
                return func(*a)
            return wrapper

        class Cache:
            def check(self, probe):
                def inner():
                    return probe(sys._getframe())
                return inner()

            @deco
            def load(self, probe):
                return probe(sys._getframe(1))
        '''))
    import importlib.util

    spec = importlib.util.spec_from_file_location("fake_srt_module", mod)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)  # type: ignore[union-attr]
    nested = m.Cache().check(path_trace.frames)
    assert nested[:2] == [("mem_cache/fake.py", "Cache.check"), ("mem_cache/fake.py", "Cache.check")]
    wrapped = m.Cache().load(path_trace.frames)  # the decorator's frame names `func` too
    assert ("mem_cache/fake.py", "deco") in wrapped and ("mem_cache/fake.py", "Cache.load") in wrapped
    assert all(not f.startswith("/") for f, _ in nested + wrapped)
    assert path_trace.frames(sys._getframe()) == []  # no SGLang frame here


def test_first_mismatch_reads_the_call_logs_a_dead_rank_left(tmp_path: Path) -> None:
    from scenarios.core.records import CollectiveCall

    logs = [call_log.CallLog(str(tmp_path), r) for r in (0, 1)]
    same = CollectiveCall("all_reduce MIN", (1,), "int32")
    for log in logs:
        log.write("attn_cp[0, 1]", same)
    logs[0].write("attn_cp[0, 1]", CollectiveCall("all_reduce MIN", (), "int32"))
    assert call_log.first_mismatch(tmp_path) is None  # rank 1 died before its next call
    logs[1].write("attn_cp[0, 1]", CollectiveCall("all_reduce MIN", (2,), "uint8"))
    for log in logs:
        log.close()
    assert call_log.first_mismatch(tmp_path) == (
        "attn_cp[0, 1], call #1: rank 0 all_reduce MIN [] int32, rank 1 all_reduce MIN [2] uint8")


def test_a_rank_gloo_killed_in_a_mismatch_is_a_divergence_not_infrastructure(tmp_path) -> None:
    from scenarios.core.errors import CollectiveMismatchDied, RankDiedError
    from scenarios.core.records import CollectiveCall
    from scenarios.judge.judging import run_checked
    from scenarios.sut.sglang.executor import died_in_mismatch

    died = RankDiedError("rank 1 (pid 1) died (killed by SIGABRT)", 1, -6)
    assert died_in_mismatch(str(tmp_path), died) is None  # no logs: the machine's, 125
    for rank, shape in ((0, (3,)), (1, (1,))):
        log = call_log.CallLog(str(tmp_path), rank)
        log.write("attn_cp[0, 1]", CollectiveCall("all_reduce MIN", shape, "int64"))
        log.close()
    found = died_in_mismatch(str(tmp_path), died)
    assert isinstance(found, CollectiveMismatchDied)

    class Dies:
        def run(self, s: object) -> list:
            raise found

    _, v = run_checked(Dies(), None)  # type: ignore[arg-type]
    assert v.status == "diverge" and v.invariant == "collectives" and "call #0" in v.message
    assert died_in_mismatch(str(tmp_path), RuntimeError("x")) is None  # only a dead rank


def test_the_command_rewrites_a_hand_edit(tmp_path: Path) -> None:
    version = "0.5.13"
    need(version)
    copy = tmp_path / "paths.md"
    committed = DOC.read_text()
    body = read_block(committed, cp.block_name(version))
    copy.write_text(committed.replace(body, body.replace("| `step` |", "| `add` |", 1), 1))
    assert copy.read_text() != committed  # the edit is seen
    assert cp.main([version, "--observed", str(OBSERVED), "--write", str(copy)]) == 0
    assert copy.read_text() == committed


@pytest.mark.parametrize("kind", ["all_reduce", "barrier", "send", "isend", "recv"])
def test_every_recorded_collective_reaches_the_call_log_and_the_trace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Collectives and point-to-point calls take one recording path: a call missing from the
    call log would turn a gloo abort on it into 125 instead of a [collectives] verdict."""
    import torch

    from scenarios.sut.sglang import rank as sut_rank

    group = object()
    run = sut_rank.Run(0, pacer=None, gates=None, storage_dir=str(tmp_path))  # type: ignore[arg-type]
    run.trace = path_trace.PathTrace()
    noted: list[str] = []
    monkeypatch.setattr(run.trace, "note", noted.append)
    monkeypatch.setattr(sut_rank, "CURRENT", run)
    monkeypatch.setitem(sut_rank._GROUP_NAMES, id(group), "attn_cp[0, 1]")
    wrap = sut_rank._recorded_p2p if kind in ("send", "isend", "recv") else sut_rank._recorded
    called = []
    wrapped = wrap(kind, lambda *a, **k: called.append(kind) or "done")
    t = torch.zeros(2, dtype=torch.int32)
    args = {"all_reduce": (t, sut_rank.dist.ReduceOp.MIN, group), "barrier": ()}.get(
        kind, (t, 1, group))
    kwargs = {"group": group} if kind == "barrier" else {}
    assert wrapped(*args, **kwargs) == "done" and called == [kind]
    run.call_log.close()
    logged = call_log.read(tmp_path)[0]
    assert [g for g, _ in logged] == ["attn_cp[0, 1]"] and logged[0][1].startswith(kind)
    assert noted == [kind]
    assert run.collectives.log["attn_cp[0, 1]"][0].op.startswith(kind)
