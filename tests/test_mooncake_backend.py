"""MooncakeStorage against a real mooncake_master on loopback, and the master's lifecycle.

Every call that could block on Mooncake runs under `bounded()`, so a regression shows up as
a failed test with a time, never as a hung run.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import torch

from reference.storage.base import StorageError, as_bytes
from reference.storage.mooncake import MooncakeConfig, MooncakeStorage
from scenarios.nemesis.mooncake_master import (
    MooncakeMaster,
    MooncakeMasterError,
    check_master_reachable,
    master_pids,
    mooncake_available,
)
from tests.mooncake_fixtures import close_all
from tests.subprocess_env import child_env
from tests.test_storage_backends import random_page, same_bytes

pytestmark = pytest.mark.mooncake

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def bounded(fn: Callable[[], T], seconds: float) -> T:
    """Run `fn` in a daemon thread; fail the test if it takes longer than `seconds`."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised below, in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"call still running after {seconds:.0f} s")
    box["elapsed"] = time.monotonic() - start
    if "error" in box:
        raise box["error"]
    return box["value"]


def page(seed: int, shape: tuple[int, ...] = (2, 16, 2, 64), dtype=torch.bfloat16) -> torch.Tensor:
    return random_page(shape, dtype, seed)


def keys_for(n: int, tag: str = "") -> list[str]:
    """Unique per call: the session master is shared by every test."""
    return [f"{uuid.uuid4().hex}{tag}_{i % 2}_{'kv'[i % 2]}" for i in range(n)]


def wait_until(pred: Callable[[], bool], seconds: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


POOL_BYTES = 4 << 20


@pytest.fixture(autouse=True, scope="module")
def _need_mooncake() -> None:
    """Skip (never fail) the whole module when Mooncake is not installed here."""
    ok, reason = mooncake_available()
    if not ok:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def clients(
    mooncake_master: str,
) -> Iterator[tuple[MooncakeStorage, MooncakeStorage, torch.Tensor]]:
    """Two clients of the session master (two ranks); the first has a registered host pool."""
    made: list[MooncakeStorage] = []
    try:
        a = MooncakeStorage(MooncakeConfig(mooncake_master))
        made.append(a)
        b = MooncakeStorage(MooncakeConfig(mooncake_master))
        made.append(b)
        pool = torch.zeros(POOL_BYTES, dtype=torch.uint8)
        a.register_mem_pool_host(pool)
        yield a, b, pool
    finally:
        close_all(made)


# ---------------------------------------------------------------- data path


@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.bfloat16, (2, 16, 2, 64)),
        (torch.float32, (1, 64, 4, 128)),  # 128 KiB page
        (torch.float8_e4m3fn, (4, 16, 1, 8)),
        (torch.int64, (3, 7)),
    ],
)
def test_round_trip_between_clients_bytes_path(
    clients: tuple[MooncakeStorage, MooncakeStorage, torch.Tensor],
    dtype: torch.dtype,
    shape: tuple[int, ...],
) -> None:
    a, b, _ = clients
    keys = keys_for(3)
    values = [page(i, shape, dtype) for i in range(3)]
    before = (a.stats.bytes_set, b.stats.bytes_get, b.stats.zero_copy_get)
    assert bounded(lambda: a.batch_set(keys, values), 10) == [True] * 3
    assert bounded(lambda: b.batch_exists(keys), 10) == 3  # b sees a's keys
    targets = [torch.empty_like(v) for v in values]
    assert bounded(lambda: b.batch_get(keys, targets), 10) == [True] * 3
    assert all(same_bytes(t, v) for t, v in zip(targets, values, strict=True))
    # b registered nothing and a's values were plain tensors: the bytes path both ways
    assert (a.stats.bytes_set, b.stats.bytes_get, b.stats.zero_copy_get) == (
        before[0] + 3,
        before[1] + 3,
        before[2],
    )


def test_zero_copy_path_inside_registered_pool(
    clients: tuple[MooncakeStorage, MooncakeStorage, torch.Tensor],
) -> None:
    a, b, pool = clients
    assert a.zero_copy and not b.zero_copy
    n = 64 << 10
    src = [pool[i * n : (i + 1) * n] for i in range(4)]
    for i, s in enumerate(src):
        s.copy_(as_bytes(page(50 + i, (n // 2,), torch.float16)))
    keys = keys_for(4)
    zc_set, zc_get, by_get = a.stats.zero_copy_set, a.stats.zero_copy_get, a.stats.bytes_get
    assert bounded(lambda: a.batch_set(keys, src), 10) == [True] * 4
    assert a.stats.zero_copy_set == zc_set + 4
    dst = [pool[(8 + i) * n : (9 + i) * n] for i in range(4)]
    assert bounded(lambda: a.batch_get(keys, dst), 10) == [True] * 4
    assert a.stats.zero_copy_get == zc_get + 4 and a.stats.bytes_get == by_get
    assert all(same_bytes(d, s) for d, s in zip(dst, src, strict=True))
    # one target outside the pool: the whole batch takes the bytes path, still correct
    outside = torch.empty(n, dtype=torch.uint8)
    got = bounded(lambda: a.batch_get(keys[:2], [dst[0], outside]), 10)
    assert got == [True, True] and a.stats.bytes_get == by_get + 2
    assert same_bytes(outside, src[1])
    # a view of the pool that is not contiguous is never zero-copy
    assert not a._registered([pool[: 2 * n].view(2, n)[:, :8]])
    # the other client reads the zero-copy writes through bytes
    plain = torch.empty(n, dtype=torch.uint8)
    assert bounded(lambda: b.batch_get(keys[3:], [plain]), 10) == [True]
    assert same_bytes(plain, src[3])


def test_batch_get_into_reads_at_addresses_inside_registered_memory_only(
    clients: tuple[MooncakeStorage, MooncakeStorage, torch.Tensor],
) -> None:
    """The prefetch path's zero-copy read (addresses from the host pool, no tensors) reads
    the same bytes as batch_get, and never writes outside registered memory: misses there."""
    a, b, pool = clients
    n = 64 << 10
    src = [pool[(12 + i) * n : (13 + i) * n] for i in range(3)]
    for i, s in enumerate(src):
        s.copy_(as_bytes(page(70 + i, (n // 2,), torch.float16)))
    keys = keys_for(3)
    assert bounded(lambda: a.batch_set(keys, src), 10) == [True] * 3
    dst = [pool[(16 + i) * n : (17 + i) * n] for i in range(3)]
    ptrs, sizes = [d.data_ptr() for d in dst], [n] * 3
    zc_get = a.stats.zero_copy_get
    assert bounded(lambda: a.batch_get_into(keys, ptrs, sizes), 10) == [True] * 3
    assert a.stats.zero_copy_get == zc_get + 3
    assert all(same_bytes(d, s) for d, s in zip(dst, src, strict=True))
    # a missing key is a miss, its neighbours still land
    dst[0].zero_()
    got = bounded(lambda: a.batch_get_into([keys[0], "absent-" + keys[1]], ptrs[:2], sizes[:2]), 10)
    assert got == [True, False] and same_bytes(dst[0], src[0])
    # a size that is not the object's is a mismatch, not a page
    assert bounded(lambda: a.batch_get_into(keys[:1], ptrs[:1], [n // 2]), 10) == [False]
    # addresses outside every registered region (b registered none; a past its pool's end):
    # misses, and nothing written there
    outside = torch.zeros(n, dtype=torch.uint8)
    assert bounded(lambda: b.batch_get_into(keys[:1], [outside.data_ptr()], [n]), 10) == [False]
    end = pool.data_ptr() + pool.numel()
    assert bounded(lambda: a.batch_get_into(keys[:1], [end - n // 2], [n]), 10) == [False]
    assert bounded(lambda: a.batch_get_into(keys[:1], [outside.data_ptr()], [n]), 10) == [False]
    assert not outside.any()
    with pytest.raises(ValueError):
        a.batch_get_into(keys[:2], ptrs[:1], sizes[:2])


def test_write_once_and_only_missing_keys_written(
    clients: tuple[MooncakeStorage, MooncakeStorage, torch.Tensor],
) -> None:
    a, b, _ = clients
    keys = keys_for(2)
    first, second = page(1), page(2)
    assert bounded(lambda: a.batch_set(keys[:1], [first]), 10) == [True]
    skipped, written = b.stats.skipped_existing_set, b.stats.bytes_set
    assert bounded(lambda: b.batch_set(keys, [second, second]), 10) == [True, True]
    assert b.stats.skipped_existing_set == skipped + 1  # keys[0] was checked, not rewritten
    assert b.stats.bytes_set == written + 1
    out = torch.empty_like(first)
    assert bounded(lambda: b.batch_get(keys[:1], [out]), 10) == [True]
    assert same_bytes(out, first)


def test_batch_exists_prefix_and_misses(
    clients: tuple[MooncakeStorage, MooncakeStorage, torch.Tensor],
) -> None:
    a, b, _ = clients
    keys = keys_for(5)
    v = page(3)
    bounded(lambda: a.batch_set([keys[i] for i in (0, 1, 3, 4)], [v] * 4), 10)
    assert bounded(lambda: b.batch_exists(keys), 10) == 2  # the hole at 2 stops the prefix
    assert bounded(lambda: b.batch_exists(keys[3:]), 10) == 2
    assert bounded(lambda: b.batch_exists([]), 10) == 0
    targets = [torch.zeros_like(v) for _ in keys]
    assert bounded(lambda: b.batch_get(keys, targets), 10) == [True, True, False, True, True]
    assert torch.count_nonzero(as_bytes(targets[2])) == 0


def test_size_mismatch_is_false_on_both_paths(
    clients: tuple[MooncakeStorage, MooncakeStorage, torch.Tensor],
) -> None:
    a, _, pool = clients
    key = keys_for(1)
    v = page(4, (1024,), torch.uint8)
    bounded(lambda: a.batch_set(key, [v]), 10)
    for size in (1000, 1100):
        assert bounded(
            lambda s=size: a.batch_get(key, [torch.empty(s, dtype=torch.uint8)]), 10
        ) == [False]
        assert bounded(lambda s=size: a.batch_get(key, [pool[:s]]), 10) == [False]


def test_two_processes_see_each_others_keys(
    clients: tuple[MooncakeStorage, MooncakeStorage, torch.Tensor], mooncake_master: str,
    tmp_path: Path,
) -> None:
    """Another process (another rank's client) reads our page and writes one we then read.
    Each transfer gets 3 tries: on the 2-core CI box a transfer between processes failed once
    under load (the child said `ready 0`); a key that is not visible fails all three."""
    a, _, _ = clients
    tag = uuid.uuid4().hex
    ours, theirs = f"{tag}_parent_0_k", f"{tag}_child_0_k"
    assert bounded(lambda: a.batch_set([ours], [page(7)]), 10) == [True]
    log = tmp_path / "child.log"  # Mooncake's own errors, for a failure message
    with log.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, mooncake_master, ours, theirs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=child_env(),
        )

    def errors() -> str:
        lines = log.read_text(errors="replace").splitlines()
        return "\n".join([ln[:300] for ln in lines
                          if (ln[:1] in "EW" or "rror" in ln) and "InitGoogle" not in ln][-15:])

    try:
        assert child.stdout is not None and child.stdin is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "child did not report within 30 s"
        # it saw our key, read our page intact and wrote its own (tries per step follow)
        said = child.stdout.readline().split()
        assert said[:3] == ["ready", "1", "-"], f"the child failed at: {said}\n{errors()}"
        out = torch.empty_like(page(8))
        for _ in range(3):  # the same allowance for a transfer that fails once under load
            if bounded(lambda: a.batch_get([theirs], [out]), 10) == [True]:
                break
            time.sleep(0.2)
        assert same_bytes(out, page(8))
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


CHILD = """
import sys, time, torch
from reference.storage.base import as_bytes
from reference.storage.mooncake import MooncakeConfig, MooncakeStorage
def page(seed, shape=(2, 16, 2, 64), dtype=torch.bfloat16):  # as in the test module
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)
def same_bytes(a, b):
    return a.nbytes == b.nbytes and torch.equal(as_bytes(a), as_bytes(b))
def tries(step):  # a transfer between processes can fail once under load: 3 tries, 0.2 s apart
    for n in (1, 2, 3):
        if step():
            return n
        time.sleep(0.2)
    return 0
address, ours, theirs = sys.argv[1:4]
s = MooncakeStorage(MooncakeConfig(address))
got = torch.empty_like(page(7))
steps = {"exists": lambda: s.batch_exists([ours]) == 1,
         "read": lambda: s.batch_get([ours], [got]) == [True] and same_bytes(got, page(7)),
         "write": lambda: s.batch_set([theirs], [page(8)]) == [True]}
took = {name: tries(step) for name, step in steps.items()}
failed = [name for name, n in took.items() if n == 0]
print('ready', int(not failed), ','.join(failed) or '-', *took.values(), flush=True)
sys.stdin.readline()  # keep our client (and the segment holding our page) until read
s.close()
"""


def test_close_while_threads_call(mooncake_master: str) -> None:
    """close() waits for calls in flight; later calls miss instead of crashing the process."""
    s = MooncakeStorage(MooncakeConfig(mooncake_master))
    keys = keys_for(8)
    vals = [page(i) for i in range(8)]
    s.batch_set(keys, vals)
    stop = threading.Event()
    errors: list[BaseException] = []
    after_close: list[int] = []

    def hammer() -> None:
        targets = [torch.empty_like(v) for v in vals]
        try:
            while not stop.is_set():
                hits = s.batch_exists(keys)
                s.batch_get(keys, targets)
                if s.closed:
                    after_close.append(hits)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    bounded(s.close, 30)
    bounded(s.close, 5)  # idempotent
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors and not any(t.is_alive() for t in threads)
    assert s.batch_exists(keys) == 0
    assert s.batch_get(keys[:1], [torch.empty_like(vals[0])]) == [False]
    assert s.batch_set(keys_for(1), [vals[0]]) == [False]
    assert s.health_check() == 1


# ---------------------------------------------------------------- faults


def test_master_restart_mid_use(fresh_mooncake_master: MooncakeMaster) -> None:
    """Outage: calls return misses in bounded time. After a restart: old keys are gone, new
    writes work (the client reconnects by itself)."""
    m = fresh_mooncake_master
    s = MooncakeStorage(MooncakeConfig(m.address))
    try:
        keys = keys_for(4)
        vals = [page(20 + i) for i in range(4)]
        assert s.batch_set(keys, vals) == [True] * 4
        m._stop_process()  # outage: the master is gone, the port closed
        assert bounded(lambda: s.batch_exists(keys), 10) == 0
        targets = [torch.empty_like(v) for v in vals]
        assert bounded(lambda: s.batch_get(keys, targets), 10) == [False] * 4
        assert bounded(lambda: s.batch_set(keys_for(1), vals[:1]), 10) == [False]
        assert s.stats.failed > 0
        m.restart()  # same port; all data lost
        assert wait_until(lambda: s.health_check() == 0, 15), "client did not reconnect"
        assert bounded(lambda: s.batch_exists(keys), 10) == 0  # misses, not errors
        assert bounded(lambda: s.batch_get(keys, targets), 10) == [False] * 4
        # Writes get -200 (no segment) until the client re-mounts its segment (~1 s).
        fresh = keys_for(2)
        assert wait_until(lambda: s.batch_set(fresh, vals[:2]) == [True, True], 15, 0.25)
        assert bounded(lambda: s.batch_exists(fresh), 10) == 2
        out = torch.empty_like(vals[1])
        assert bounded(lambda: s.batch_get(fresh[1:], [out]), 10) == [True]
        assert same_bytes(out, vals[1])
    finally:
        bounded(s.close, 30)


def test_unreachable_master_fails_fast_with_one_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once we leave: nothing listens there
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        bounded(lambda: MooncakeStorage(MooncakeConfig(f"127.0.0.1:{port}")), 10)
    assert time.monotonic() - start < 3
    msg = str(err.value)
    assert msg.startswith(f"Mooncake master 127.0.0.1:{port} unreachable") and "\n" not in msg


def test_setup_failure_names_master(fresh_mooncake_master: MooncakeMaster) -> None:
    """Without the TCP probe, setup()'s own failure (-1 after its retry) is reported."""
    address = fresh_mooncake_master.address
    fresh_mooncake_master.stop()
    with pytest.raises(StorageError) as err:
        bounded(lambda: MooncakeStorage(MooncakeConfig(address, probe_timeout_s=0)), 20)
    assert str(err.value) == f"Mooncake master {address} unreachable (setup returned -1)"


def test_bad_address_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="HOST:PORT"):
        MooncakeStorage(MooncakeConfig("no-port-here"))


def test_check_master_reachable(mooncake_master: str) -> None:
    check_master_reachable(mooncake_master, timeout=5)  # no exception
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(MooncakeMasterError) as err:
        check_master_reachable(f"127.0.0.1:{port}", timeout=2)
    assert str(err.value).startswith(f"Mooncake master 127.0.0.1:{port} unreachable")
    assert "\n" not in str(err.value)
    with pytest.raises(MooncakeMasterError, match="HOST:PORT"):
        check_master_reachable("localhost", timeout=1)


# ---------------------------------------------------------------- master lifecycle


def test_master_on_port_held_by_a_listener() -> None:
    """The port probe would succeed against the squatter; start() must notice our exit."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        master = MooncakeMaster(rpc_port=port, start_timeout_s=10)
        with pytest.raises(MooncakeMasterError) as err:
            bounded(master.start, 15)
        assert f"127.0.0.1:{port}" in str(err.value) and "exited with code" in str(err.value)
        assert not master.running and master_pids(port) == []
        master.stop()


def test_master_on_port_of_another_master(fresh_mooncake_master: MooncakeMaster) -> None:
    first = fresh_mooncake_master
    second = MooncakeMaster(rpc_port=first.rpc_port, start_timeout_s=10)
    with pytest.raises(MooncakeMasterError, match="exited with code"):
        bounded(second.start, 15)
    second.stop()
    assert first.running and master_pids(first.rpc_port) == [first.pid]


def test_stop_leaves_no_master_and_restart_keeps_port() -> None:
    master = MooncakeMaster()
    try:
        bounded(master.start, 20)
        port, pid = master.rpc_port, master.pid
        assert master_pids(port) == [pid]
        bounded(master.restart, 20)
        assert master.rpc_port == port and master.pid != pid and master_pids(port) == [master.pid]
        check_master_reachable(master.address, timeout=2)
        log = master.log_path
        assert log is not None and os.path.exists(log)
    finally:
        bounded(master.stop, 15)
    bounded(master.stop, 5)  # idempotent
    assert master_pids(port) == [] and not psutil.pid_exists(pid)
    assert not os.path.exists(log)  # the temp log goes with it


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_master_dies_with_its_owner(sig: signal.Signals) -> None:
    """SIGTERM/SIGINT run our handlers; SIGKILL leaves it to the kernel (pdeathsig)."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=child_env(),
    )
    port, log_path = None, None
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 30)
        assert ready, "owner did not start a master within 30 s"
        port_text, log_path = owner.stdout.readline().split()
        port = int(port_text)
        assert len(master_pids(port)) == 1
        owner.send_signal(sig)
        owner.wait(timeout=15)
        assert wait_until(lambda: master_pids(port) == [], 10), f"master on {port} left behind"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=10)
        if port is not None:
            for pid in master_pids(port):  # only ours: matched by its unique port
                os.kill(pid, signal.SIGKILL)
        if log_path is not None and os.path.exists(log_path):  # SIGKILL skips the owner's
            os.unlink(log_path)  # clean-up, so its temp log is ours to remove


OWNER = """
import time
from scenarios.nemesis.mooncake_master import MooncakeMaster
m = MooncakeMaster().start()
print(m.rpc_port, m.log_path, flush=True)
time.sleep(60)
"""
