"""Mooncake under the SGLang SUT: SGLang's own `MooncakeStore` against a master the harness owns.

Harness side (`MasterHolder`, used by the executor): one `mooncake_master` per executor, started
on the first Mooncake run and stopped when the executor closes (and by mooncake_master's atexit,
signal and parent-death handlers on Ctrl-C or a crash).

Worker side (a torchrun rank of the pool): how the run configures SGLang's store (the same
`hicache_storage_backend_extra_config` keys a user passes: master address, P2PHANDSHAKE
metadata, tcp, global segment size, `extra_backend_tag`), one Mooncake client per worker
shared by every run (SGLang keeps one store per process; opening one costs ~0.1 s and closing
one 1-2 s), and the end of a run: which of the keys this rank wrote the master still holds and
their bytes as read back from it, then removing the run's keys and unregistering its host pool.

Runs never share keys: each run's keys carry its run id as SGLang's `extra_backend_tag` prefix
(`{run_id}_{hash}_{tp}_k`), so a page stored by an earlier run is never a hit.
This module imports no sglang: the backend class SGLang builds is in `mooncake_store.py`.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import urllib.request
from typing import Any

from scenarios.core.errors import ReadBackFailed

#: the name SGLang's controller and host pool key their Mooncake paths on (zero-copy
#: batch_get_v1 / batch_set_v1, MooncakeHostTensorAllocator)
BACKEND = "mooncake"
#: Mooncake stores pages per (page, k|v) across layers: page-first host layout, direct IO on CPU
LAYOUT = "page_first_direct"
#: what each rank contributes to the pool (SGLang divides global_segment_size by its tp size)
SEGMENT_BYTES = 32 << 20
WARMUP_PREFIX = "sglang_mooncake_store_warmup_key"
#: a worker starved of CPU (four SGLang ranks on two cores) misses heartbeats for seconds; with
#: the reference's 2 s the master dropped a live client's segment and objects mid-run (seen as
#: SGLang's warm-up assertion failing). Runs never share keys, so a dead client's objects
#: lingering this long change nothing.
CLIENT_TTL_S = 30


#: what SGLang does not report that the reference does, on this backend (stated in verdicts)
NOT_OBSERVED = ("no per-thread decision channels (SGLang's prefetch-thread agreements are "
                "seen as collectives only)", "no store-side copy count from the client (the keys "
                "each rank wrote are read back from the Mooncake master, with their bytes)")


def worker_env() -> dict[str, str]:
    """Client settings for the pool's workers: quiet logs, bounded RPC waits and set-up
    retries (a missing master answers in seconds, not the default ~90 s)."""
    return {"MC_LOG_LEVEL": "ERROR", "GLOG_minloglevel": "2", "MC_RPC_TIMEOUT_MS": "5000",
            "MC_STORE_CLIENT_SETUP_RETRIES": "3"}


# -- harness side ---------------------------------------------------------------------------

class MasterHolder:
    """The executor's master: the address given, or one started here on first use."""

    def __init__(self, address: str = "") -> None:
        self.given = address
        self.master: Any = None

    def address(self) -> tuple[str, str]:
        """(rpc "host:port", metrics "host:port" or "" when the master is not ours)."""
        if self.given:
            if self.master is None:  # checked once: it must answer
                check_master(self.given)
                self.master = False
            return self.given, ""
        if self.master is None or not self.master.running:
            from scenarios.core.errors import CannotJudge
            from scenarios.nemesis.mooncake_master import MooncakeMaster, mooncake_available

            ok, why = mooncake_available()
            if not ok:
                raise CannotJudge(f"backend 'mooncake' is not available here: {why}")
            self.master = MooncakeMaster(client_ttl_s=CLIENT_TTL_S).start()
        m = self.master
        return m.address, f"{m.host}:{m.metrics_port}"

    def close(self) -> None:
        if self.master:
            self.master.stop()
            self.master = None


def check_master(address: str) -> None:
    """A given --mooncake-master must answer (one line, 125, otherwise)."""
    from scenarios.core.errors import CannotJudge
    from scenarios.nemesis.mooncake_master import MooncakeMasterError, check_master_reachable

    try:
        check_master_reachable(address, timeout=3.0)
    except MooncakeMasterError as e:
        raise CannotJudge(str(e)) from None


def master_keys(metrics: str, prefix: str) -> list[str]:
    """Every key the master holds that starts with `prefix` (its HTTP `get_all_keys`)."""
    with urllib.request.urlopen(f"http://{metrics}/get_all_keys", timeout=5) as r:
        text = r.read().decode()
    return sorted(k for k in text.split() if k.startswith(prefix))


# -- worker side: configuration ---------------------------------------------------------------

def storage_args(backend: str, run: Any, extra: dict, tp_size: int) -> dict:
    """ServerArgs fields for the run's storage backend; `extra` is the prefetch part of
    `hicache_storage_backend_extra_config`, `tp_size` the TP size SGLang's storage config
    divides the global segment by (attention TP with DP attention, TP otherwise)."""
    if backend != BACKEND:
        return {"hicache_mem_layout": "layer_first", "hicache_storage_backend": "file",
                "extra": extra}
    cfg = {"master_server_address": run.mooncake_master, "local_hostname": "127.0.0.1",
           "metadata_server": "P2PHANDSHAKE", "protocol": "tcp", "device_name": "",
           "global_segment_size": SEGMENT_BYTES * tp_size, "check_server": False,
           "standalone_storage": False, "extra_backend_tag": run_tag(run)}
    return {"hicache_mem_layout": LAYOUT, "hicache_storage_backend": BACKEND,
            "extra": {**extra, **cfg}}


def run_tag(run: Any) -> str:
    return f"cpcheck{run.run_id}"


# -- worker side: the shared client -----------------------------------------------------------

class SharedClient:
    """Stands in for `MooncakeDistributedStore()` in SGLang's store: the first `setup` opens the
    worker's client with SGLang's own arguments, later ones (one per run) reuse it. Buffers
    registered and warm-up keys put during a run are remembered so the run can undo them."""

    def __init__(self, master: str, cls: Any = None) -> None:
        if cls is None:
            from mooncake.store import MooncakeDistributedStore as cls

        self.master = master
        self.inner = cls()
        self.setup_args: tuple | None = None
        self.setup_calls = 0  # one per SGLang store built (per run); one real set-up
        self.opened = False
        self.lock = threading.Lock()
        self.buffers: list[int] = []
        self.warmup_keys: list[str] = []
        #: read-back reads that failed once and were asked again (a transfer under load)
        self.read_back_retries = 0

    def setup(self, *args: Any) -> int:
        with self.lock:
            self.setup_calls += 1
            if self.opened:
                return 0
            code = self.inner.setup(*args)
            if code == 0:
                self.opened, self.setup_args = True, args
            return code

    def register_buffer(self, ptr: int, size: int) -> int:
        code = self.inner.register_buffer(ptr, size)
        if code == 0:
            with self.lock:
                self.buffers.append(ptr)
        return code

    def put(self, key: str, value: Any, *a: Any, **k: Any) -> int:
        if key.startswith(WARMUP_PREFIX):
            with self.lock:
                self.warmup_keys.append(key)
        return self.inner.put(key, value, *a, **k)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


_clients: dict[str, SharedClient] = {}
_clients_lock = threading.Lock()


def shared_client(master: str, cls: Any = None) -> SharedClient:
    """This worker's client for `master` (`cls`: the real MooncakeDistributedStore class)."""
    with _clients_lock:
        c = _clients.get(master)
        if c is None:
            c = _clients[master] = SharedClient(master, cls)
        return c


# -- worker side: the end of a run ------------------------------------------------------------

def _blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def read_back(run: Any) -> list[str]:
    """The keys this rank wrote that the master still holds (`stored`), read from the master.
    Their bytes are fetched too and recorded as a read of this rank (op "get"), so the
    checker's page invariant compares what the master holds with what was written."""
    client = _clients.get(run.mooncake_master)
    if client is None or not client.opened:
        return []
    written = sorted({k for op, keys, ok, _ in run.storage if op == "set"
                      for k, good in zip(keys, ok, strict=False) if good})
    if not written:
        return []
    codes = list(client.batch_is_exist(written))
    stored = [k for k, c in zip(written, codes, strict=True) if c == 1]
    if stored:
        data = list(client.get_batch(stored))
        failed = [i for i, d in enumerate(data) if not d]
        if failed:  # the master lists these keys: a read that failed in transit, once more
            time.sleep(0.05)
            again = list(client.get_batch([stored[i] for i in failed]))
            for i, d in zip(failed, again, strict=False):
                data[i] = d
            client.read_back_retries += len(failed)
        ok = [bool(d) for d in data]
        sums = [_blake(bytes(d)) if d else "" for d in data]
        with run.lock:
            run.storage.append(["get", list(stored), ok, sums])
        lost = ok.count(False)
        if lost:  # the page invariant compares only what came back: say the check is partial
            raise ReadBackFailed(f"{lost} of {len(stored)} keys the master lists could not be "
                                 "read back (twice): their bytes go unchecked")
    return stored


def client_info(run: Any) -> dict:
    """How SGLang set up this worker's client (its own arguments) and how often it asked."""
    c = _clients.get(run.mooncake_master)
    if c is None:
        return {}
    args = [a if isinstance(a, str | int | float | bool) or a is None else repr(a)
            for a in (c.setup_args or ())]
    return {"setup_args": args, "setup_calls": c.setup_calls, "opened": c.opened,
            "read_back_retries": c.read_back_retries}


def end_run(run: Any) -> None:
    """Drop the run's keys and warm-up keys from the master and unregister its host pool (after
    every rank has read back, and after the cache's threads stopped)."""
    client = _clients.get(run.mooncake_master)
    if client is None or not client.opened:
        return
    with client.lock:
        buffers, client.buffers = client.buffers, []
        warm, client.warmup_keys = client.warmup_keys, []
    try:
        client.remove_by_regex("^" + re.escape(run_tag(run) + "_"), True)
        if warm:
            client.batch_remove(warm, True)
    finally:
        for ptr in buffers:
            client.unregister_buffer(ptr)


def close_clients() -> None:
    """Close this process's shared clients (tests; a worker's die with it)."""
    with _clients_lock:
        todo = list(_clients.values())
        _clients.clear()
    for c in todo:
        if c.opened:
            c.inner.close()
