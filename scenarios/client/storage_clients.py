"""Mooncake clients that live as long as the process (the rank pool, or the in-process soak).

Opening a Mooncake client takes ~0.1 s and closing one 1-3 s (its heartbeat), so opening one
per rank per run made Mooncake soaks ~100x slower than the memory backend. Runs never share
keys (every run's keys start with its own `run_id_` prefix), so one client per (master, rank)
can serve every run: a run gets a :class:`LeasedMooncake` whose `close()` unregisters the host
pool that run registered and drops that run's keys, and leaves the client open.

`close_all()` really closes them (the in-process executor calls it when it closes); a torchrun
worker's clients die with the worker, and the master forgets them after its client TTL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from reference.api import HiCacheStorage, MooncakeConfig, MooncakeStorage, StorageError

_lock = threading.Lock()
_clients: dict[tuple[str, int], MooncakeStorage] = {}

#: what each rank contributes and stages; the soak's pages are small, the pool is a cache
SEGMENT_BYTES = 32 << 20
BUFFER_BYTES = 8 << 20


def _open(master: str) -> MooncakeStorage:
    cfg = MooncakeConfig(master_address=master, global_segment_size=SEGMENT_BYTES,
                         local_buffer_size=BUFFER_BYTES)
    # a client that starts while its master restarts retries, as a serving rank would
    for attempt in range(4):
        try:
            return MooncakeStorage(cfg)
        except StorageError:
            if attempt == 3:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def client(master: str, rank: int) -> MooncakeStorage:
    """This process's client for `rank` on `master`, opened on first use."""
    key = (master, rank)
    with _lock:
        c = _clients.get(key)
        if c is not None and not c.closed:
            return c
    c = _open(master)
    with _lock:
        old = _clients.get(key)
        if old is not None and not old.closed:  # lost a race: keep the first
            extra, c = c, old
        else:
            _clients[key] = c
            extra = None
    if extra is not None:
        extra.close()
    return c


def lease(master: str, rank: int, run_id: str) -> LeasedMooncake:
    """A per-run view of the long-lived client; see the module docstring."""
    return LeasedMooncake(client(master, rank), f"{run_id}_")


def close_all() -> None:
    """Close every client this process opened (each close takes 1-3 s; done in parallel)."""
    with _lock:
        todo = list(_clients.values())
        _clients.clear()
    threads = [threading.Thread(target=c.close, daemon=True) for c in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40.0)


def open_clients() -> int:
    with _lock:
        return sum(not c.closed for c in _clients.values())


class LeasedMooncake(HiCacheStorage):
    """One run's use of a shared client: same calls, but `close()` only cleans up the run."""

    def __init__(self, inner: MooncakeStorage, key_prefix: str) -> None:
        self.inner = inner
        self.key_prefix = key_prefix
        self._buffers: list[torch.Tensor] = []
        self._closed = False

    @property
    def zero_copy(self) -> bool:  # type: ignore[override]
        return self.inner.zero_copy

    @property
    def stats(self):  # noqa: ANN201
        return self.inner.stats

    def register_mem_pool_host(self, buffer: torch.Tensor) -> None:
        self.inner.register_mem_pool_host(buffer)
        self._buffers.append(buffer)

    def batch_exists(self, keys: Sequence[str]) -> int:
        return self.inner.batch_exists(keys)

    def batch_get(self, keys: Sequence[str], targets: Sequence[torch.Tensor]) -> list[bool]:
        return self.inner.batch_get(keys, targets)

    def batch_get_into(self, keys: Sequence[str], ptrs: Sequence[int],
                       sizes: Sequence[int]) -> list[bool]:
        return self.inner.batch_get_into(keys, ptrs, sizes)

    def batch_set(self, keys: Sequence[str], values: Sequence[torch.Tensor]) -> list[bool]:
        return self.inner.batch_set(keys, values)

    def close(self) -> None:
        """Unregister this run's host pool and drop its keys; the client stays open."""
        if self._closed:
            return
        self._closed = True
        for b in self._buffers:
            self.inner.unregister_mem_pool_host(b)
        self._buffers.clear()
        self.inner.remove_prefix(self.key_prefix)
