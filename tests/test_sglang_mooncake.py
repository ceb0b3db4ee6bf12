"""SGLang's own MooncakeStore as the SUT's storage, on a real Mooncake master.

Unit tests (marker `mooncake`): the read-back of a run's keys from the master, its cleanup, the
store configuration SGLang is given, and the executor's master lifecycle. `sglang`-marked tests
drive real releases (0.5.10.post1 pre-fix, 0.5.11 post-fix) and are skipped, with the command
that builds them, when an environment is missing here.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from scenarios.judge.checker import check, check_pages
from scenarios.sut.sglang import mooncake
from tests.sglang_envs import POST, PRE, need, started, verdicts_by_release

pytestmark = pytest.mark.mooncake

CORPUS = sorted((Path(__file__).parent.parent / "scenarios" / "corpus" / "sglang").glob("*.json"))
#: SGLang's MHA naming with the run's tag: {tag}_{page hash}_{tp rank}_{k|v}
KEY = re.compile(r"^cpcheck(r[0-9a-f]{10})_([0-9a-f]{64})_(\d+)_([kv])$")


# -- unit: read-back and cleanup against a real master ------------------------------------------

def _fake_run(address: str, run_id: str) -> SimpleNamespace:
    return SimpleNamespace(mooncake_master=address, run_id=run_id, storage=[],
                           lock=threading.Lock())


def test_read_back_keeps_only_what_the_master_holds_and_checks_its_bytes(fresh_mooncake_master):
    """`stored` is what the master answers, not what the rank believes it wrote; the bytes read
    back from the master go through the checker's page invariant (planted: a wrong byte)."""
    from mooncake.store import MooncakeHostMemAllocator  # noqa: F401  (the wheel imports)

    m = fresh_mooncake_master
    run = _fake_run(m.address, "rabc0000001")
    tag = mooncake.run_tag(run)
    client = mooncake.shared_client(m.address)
    try:
        assert client.setup("127.0.0.1", "P2PHANDSHAKE", 16 << 20, 16 << 20, "tcp", "",
                            m.address) == 0
        assert client.setup("ignored: the client is open") == 0  # later runs reuse it
        keys = [f"{tag}_{'a' * 64}_0_{p}" for p in "kv"] + [f"{tag}_{'b' * 64}_0_k"]
        pages = [b"\x01" * 256, b"\x02" * 256]
        for k, v in zip(keys, pages, strict=False):
            assert client.put(k, v) == 0
        # the rank believes it wrote three keys; the master holds two of them
        sums = [mooncake._blake(p) for p in pages] + [mooncake._blake(b"\x03" * 256)]
        run.storage.append(["set", keys, [True] * 3, sums])
        stored = mooncake.read_back(run)
        assert stored == sorted(keys[:2])
        assert stored == mooncake.master_keys(f"{m.host}:{m.metrics_port}", tag)
        op, got, ok, got_sums = run.storage[-1]
        assert op == "get" and got == stored and all(ok)
        assert got_sums == [dict(zip(keys, sums, strict=False))[k] for k in stored]
        assert check_pages([_result(0, run.storage, stored)]) == []
        # planted: the master holds other bytes than the rank wrote -> the page invariant fires
        bad = [list(e) for e in run.storage]
        bad[0][3] = [sums[0][::-1]] + sums[1:]
        found = check_pages([_result(0, bad, stored)])
        assert found and "was written" in found[0], found
        # the end of the run removes its keys and warm-up keys, and unregisters its buffer
        assert client.put(mooncake.WARMUP_PREFIX + "x", b"w" * 64) == 0
        mooncake.end_run(run)
        assert mooncake.master_keys(f"{m.host}:{m.metrics_port}", tag) == []
        assert mooncake.master_keys(f"{m.host}:{m.metrics_port}", mooncake.WARMUP_PREFIX) == []
        assert client.warmup_keys == [] and client.buffers == []
    finally:
        mooncake.close_clients()


class _FlakyTransfer:
    """A Mooncake client whose first `fails` reads of a key come back empty (a transfer that
    failed in transit; the master still lists the key)."""

    def __init__(self, held: dict[str, bytes], fails: int) -> None:
        self.held, self.fails, self.reads = held, fails, 0

    def setup(self, *args: object) -> int:
        return 0

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        return [int(k in self.held) for k in keys]

    def get_batch(self, keys: list[str]) -> list[bytes]:
        self.reads += 1
        return [b"" if self.reads <= self.fails else self.held[k] for k in keys]


@pytest.mark.parametrize("fails", [1, 2])
def test_read_back_asks_once_more_for_what_failed_in_transit(fails: int) -> None:
    """A read-back read that comes back empty is asked again once (counted in the client's
    `read_back_retries`); one that fails twice is recorded as failed and raises ReadBackFailed,
    which the rank reports as infrastructure (the run is `unknown`): the page invariant checks
    only reads that came back, so a silent partial check would pass unseen."""
    from scenarios.sut.sglang.rank import _machine_broke

    held = {"k1": b"\x01" * 8, "k2": b"\x02" * 8}
    address = f"flaky-{fails}:1"
    client = mooncake.shared_client(address, cls=lambda: _FlakyTransfer(held, fails))
    try:
        assert client.setup("x") == 0
        run = _fake_run(address, f"rflaky{fails}")
        run.storage.append(["set", sorted(held), [True, True], ["", ""]])
        if fails == 1:
            assert mooncake.read_back(run) == sorted(held)
        else:
            with pytest.raises(mooncake.ReadBackFailed) as e:
                mooncake.read_back(run)
            assert "2 of 2 keys" in str(e.value)
            assert _machine_broke(e.value) == ("reading the run's pages back from the "
                                               "Mooncake master")
        op, keys, ok, sums = run.storage[-1]
        assert op == "get" and client.inner.reads == 2
        assert ok == ([True, True] if fails == 1 else [False, False])
        assert (sums[0] != "") is (fails == 1)
        assert client.read_back_retries == 2
        assert mooncake.client_info(run)["read_back_retries"] == 2
    finally:
        mooncake._clients.pop(address, None)


def _result(rank: int, storage: list, stored: list):  # noqa: ANN202
    """A rank result holding only what the page invariant reads (as the SGLang rank builds it)."""
    from scenarios.core.records import RankResult, StorageCall

    return RankResult(rank=rank, stored=tuple(stored), storage=tuple(
        StorageCall(op, tuple(k), tuple(ok), tuple(c)) for op, k, ok, c in storage))


def test_storage_args_configure_sglangs_store_as_a_user_would() -> None:
    run = SimpleNamespace(mooncake_master="127.0.0.1:5555", run_id="r0123456789")
    base = {"prefetch_threshold": 4}
    f = mooncake.storage_args("file", run, base, 2)
    assert (f["hicache_mem_layout"], f["hicache_storage_backend"], f["extra"]) == \
        ("layer_first", "file", base)
    m = mooncake.storage_args("mooncake", run, base, 2)
    assert m["hicache_storage_backend"] == "mooncake"
    assert m["hicache_mem_layout"] == "page_first_direct"  # Mooncake + direct IO on CPU
    e = m["extra"]
    assert e["prefetch_threshold"] == 4 and e["master_server_address"] == "127.0.0.1:5555"
    assert (e["protocol"], e["metadata_server"], e["extra_backend_tag"]) == \
        ("tcp", "P2PHANDSHAKE", "cpcheckr0123456789")
    assert e["global_segment_size"] == 2 * mooncake.SEGMENT_BYTES  # SGLang divides by tp


def test_executor_master_starts_on_first_use_and_stops_on_close() -> None:
    from scenarios.nemesis.mooncake_master import master_pids, mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)
    holder = mooncake.MasterHolder()
    address, metrics = holder.address()
    port = int(address.rsplit(":", 1)[1])
    assert master_pids(port) and holder.address() == (address, metrics)  # one per holder
    assert mooncake.master_keys(metrics, "") == []  # answers, holds nothing yet
    holder.close()
    assert master_pids(port) == []


def test_a_given_master_that_does_not_answer_cannot_judge() -> None:
    from scenarios.core.errors import CannotJudge

    with pytest.raises(CannotJudge, match="unreachable"):
        mooncake.MasterHolder("127.0.0.1:1").address()


# -- real releases ------------------------------------------------------------------------------

def _need(*versions: str) -> None:
    from scenarios.nemesis.mooncake_master import mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)
    need(*versions)


@pytest.fixture(scope="module")
def executors():
    _need(PRE, POST)
    yield from started(PRE, POST)


def _write_acks(layout: str = "1x2"):
    from scenarios.generate.catalog import load_scenario

    return load_scenario("write_acks").with_(layout=layout, backend="mooncake")


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_write_acks_on_mooncake_split_cp_peers_before_the_fix_only(executors) -> None:
    """The catalog's write-ack interleaving, CP=2 with DP attention, on SGLang's MooncakeStore:
    0.5.10.post1 issues no collective and the peers ack different writes; 0.5.11 agrees."""
    s = _write_acks()
    pre = executors[PRE].run(s.with_(sut=f"sglang=={PRE}"), True)
    assert check(s, pre).invariant == "decisions"
    assert all(not r.collectives for r in pre)
    post = executors[POST].run(s.with_(sut=f"sglang=={POST}"), True)
    v = check(s, post)
    assert v.ok, v.summary()
    assert any(name.startswith("attn_cp") for name in post[0].collectives)
    # the backups went through SGLang's zero-copy Mooncake path, under SGLang's key names
    sets = [c.keys for r in post for c in r.storage if c.op == "set"]
    assert sets and all(KEY.match(k) for keys in sets for k in keys)


#: the corpus files with a verdict for a release this file starts (the others, e.g. the decode
#: side found on 0.5.13 / 0.5.20, are checked on their own releases by their soak tests)
ON_PRE_OR_POST = [p for p in CORPUS if {f"sglang=={PRE}", f"sglang=={POST}"}
                  & set(json.loads(p.read_text()).get("expect_by_release", {}))]


@pytest.mark.sglang
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", ON_PRE_OR_POST, ids=[p.stem for p in ON_PRE_OR_POST])
def test_corpus_keeps_its_verdict_per_release_on_mooncake(executors, path: Path) -> None:
    """The corpus replays (found on the file backend) keep their verdict per release on
    Mooncake: the pre-fix divergence is still found, the post-fix release still agrees."""
    from scenarios.store.replay import read_replay

    s, data = read_replay(path)
    s = s.with_(backend="mooncake")
    checked = 0
    for sut, invariant, v in verdicts_by_release(executors, s, data):
        assert v.invariant == invariant, f"{sut}: {v.summary()}"
        checked += 1
    assert checked


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_keys_are_read_back_from_the_master(executors) -> None:
    """`stored` comes from the master: SGLang's names, the same keys on CP peers with DP
    attention, one key per global TP rank without it (so the checker, told DP attention was
    on, finds CP-split duplicates in the store), and nothing left on the master after a run.

    CP peers back up the same pages at about the same time, and SGLang's `batch_set_v1` asks
    which keys exist before it puts the rest. Seen once in CI: one peer's puts of 4 pages
    failed, the other peer's succeeded, and the master held those pages' v parts without
    their k (the cause is not known; two clients racing exists-then-put on the same keys
    lost nothing in 80 rounds here). Which peer's put took is timing; what each asked is not."""
    ex = executors[POST]
    s = _write_acks().with_(sut=f"sglang=={POST}")
    on = ex.run(s, True)
    asked = {r.rank: {k for c in r.storage if c.op == "set" for k in c.keys} for r in on}
    stored = {r.rank: set(r.stored) for r in on}
    assert asked[0] and asked[0] == asked[1]  # the same SGLang names on both CP peers
    assert stored[0] <= asked[0] and stored[1] <= asked[1] and stored[0] | stored[1]
    # nothing reached the master outside the recorded (gated) calls; all it lists was asked
    listed = set(next(r for r in on if r.rank == 0).snapshot.mooncake_master_keys)
    assert stored[0] | stored[1] <= listed <= asked[0]
    assert {KEY.match(k).group(3) for k in asked[0]} == {"0"}  # attention-TP rank 0
    tags = {KEY.match(k).group(1) for k in asked[0]}
    assert len(tags) == 1  # one run, one tag
    # each rank read every stored key's bytes back from the master and they match its writes
    for r in on:
        back = [c for c in r.storage if c.op == "get" and list(c.keys) == sorted(r.stored)]
        assert back and all(back[-1].ok)
    assert check(s, on).ok
    # SGLang's own set-up arguments: P2PHANDSHAKE, its per-TP segment, tcp, this master; one
    # client per worker, reused by every run (SGLang asked once per run)
    info = on[0].snapshot.mooncake_client
    host, meta, segment, _buf, proto, _dev, master = info["setup_args"][:7]
    master_address, metrics = ex.mooncake.address()
    assert (host, meta, proto, master) == ("127.0.0.1", "P2PHANDSHAKE", "tcp", master_address)
    assert segment == mooncake.SEGMENT_BYTES and info["opened"] and info["setup_calls"] >= 1
    again = ex.run(s, True)[0].snapshot.mooncake_client
    assert again["setup_calls"] == info["setup_calls"] + 1 and again["setup_args"] == \
        info["setup_args"]
    assert mooncake.master_keys(metrics, "cpcheck") == []  # the run removed its keys

    off = ex.run(s.with_(dp_attention=False), False)
    parts = [{KEY.match(k).group(3) for k in r.stored} for r in sorted(off, key=lambda r: r.rank)]
    assert parts == [{"0"}, {"1"}]  # SGLang keys by the global TP rank without DP attention
    from scenarios.sut.sglang.executor import annotate

    assert annotate(check(s.with_(dp_attention=False), off), False, "mooncake").ok
    v = check(s.with_(dp_attention=True), off)
    assert v.invariant == "keys"
    assert any("CP-split duplicates" in m for _, m in v.failures), v.failures


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_cli_run_with_mooncake_exits_1_before_the_fix_and_leaves_no_master(capsys, tmp_path
                                                                           ) -> None:
    import psutil

    from scenarios.cli.main import main

    def masters() -> set[int]:  # this process's own (a module fixture's executors hold some)
        return {p.pid for p in psutil.Process().children(recursive=True)
                if any("mooncake_master" in a for a in (p.cmdline() or [])[:3])}

    _need(PRE)
    before = masters()
    assert main(["run", "write_acks", "--sut", f"sglang=={PRE}", "--layout", "1x2",
                 "--backend", "mooncake", "--replay-dir", str(tmp_path)]) == 1
    assert "DIVERGE [decisions]" in capsys.readouterr().out
    assert list(tmp_path.glob("replay-sglang-*.json"))
    assert masters() <= before, "the run left its Mooncake master behind"


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_0_5_13_agrees_on_mooncake_where_it_agrees_on_files() -> None:
    """0.5.13 (MIN over the finished loads) agrees on Mooncake: write_acks on 1x2 with and
    without DP attention, and the 2x2 corpus file that 0.5.11 still diverges on."""
    from scenarios.store.replay import read_replay
    from scenarios.sut.sglang.executor import SglangExecutor

    _need("0.5.13")
    sut = "sglang==0.5.13"
    with SglangExecutor("0.5.13", timeout_s=20, build=False) as ex:
        for dp in (True, False):
            v = ex.check(_write_acks().with_(sut=sut, dp_attention=dp))
            assert v.ok, f"dp_attention={dp}: {v.summary()}"
        for path in CORPUS:
            s, data = read_replay(path)
            if data["expect_by_release"].get(sut, "absent") is None:
                v = ex.check(s.with_(sut=sut, backend="mooncake"))
                assert v.ok, f"{path.name}: {v.summary()}"
