"""L3 store on a real Mooncake cluster: one `MooncakeDistributedStore` client per rank.

Set up as SGLang does on a single host without a metadata server (P2PHANDSHAKE over TCP on
loopback). Existence is checked with `batch_is_exist`, only missing keys are written, and
pages move zero-copy (`batch_put_from` / `batch_get_into`) when they lie in host memory
registered with `register_mem_pool_host`; anything else goes through bytes.

Every data call maps Mooncake's return codes to per-key booleans: a failure (master down,
RPC timeout, no space) is a miss, never an exception, because these calls run on the
controller's IO threads. `mooncake` is imported lazily so `reference` works without it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from reference.storage.base import HiCacheStorage, StorageError, as_bytes

logger = logging.getLogger(__name__)

INSTALL_HINT = "mooncake is not installed: pip install 'cpcheck[mooncake-cpu]'"

# Mooncake error codes seen in 0.3.13 (see docs/design/mooncake.md).
OBJECT_ALREADY_EXISTS = -705


@dataclass
class MooncakeConfig:
    """How one rank's client joins the cluster (SGLang's defaults for a loopback host)."""

    master_address: str  # "host:port" of mooncake_master's RPC port
    global_segment_size: int = 64 << 20  # bytes this client contributes to the pool
    local_buffer_size: int = 16 << 20  # staging buffer; one non-zero-copy put must fit
    protocol: str = "tcp"
    local_hostname: str = "127.0.0.1"
    metadata_server: str = "P2PHANDSHAKE"
    device_name: str = ""  # RDMA devices; unused over tcp
    #: MC_RPC_TIMEOUT_MS default: bounds each call when the master hangs (default 30 s)
    rpc_timeout_ms: int = 2000
    #: MC_STORE_CLIENT_SETUP_RETRIES default: 0 fails even with a live master, 1 is enough
    setup_retries: int = 1
    #: TCP probe of the master before setup(); fails in ms instead of setup's ~4 s retry.
    #: 0 disables the probe.
    probe_timeout_s: float = 2.0
    #: how long close() waits for in-flight calls before giving up on closing the client
    close_timeout_s: float = 30.0


@dataclass
class MooncakeStats:
    """Pages moved per path, so tests can assert which path a call took."""

    zero_copy_get: int = 0
    bytes_get: int = 0
    zero_copy_set: int = 0
    bytes_set: int = 0
    skipped_existing_set: int = 0
    failed: int = 0  # keys (exists: calls) that got an error code or an exception
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


def _set_env_defaults(config: MooncakeConfig) -> None:
    """Quiet, fast-failing client defaults; values the user already exported win."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", str(config.setup_retries))
    os.environ.setdefault("MC_RPC_TIMEOUT_MS", str(config.rpc_timeout_ms))


def _import_store() -> Any:
    """The `mooncake.store` module, or a StorageError that says how to get it."""
    try:
        return importlib.import_module("mooncake.store")
    except ImportError as e:
        try:
            installed = importlib.util.find_spec("mooncake") is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            raise StorageError(INSTALL_HINT) from e
        # Installed but broken, typically: libibverbs.so.1 missing (apt-get install libibverbs1).
        raise StorageError(f"mooncake is installed but failed to import: {e}") from e


def split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port"; StorageError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StorageError(f"invalid Mooncake master address {address!r} (want HOST:PORT)")
    return host.strip("[]"), int(port)


class MooncakeStorage(HiCacheStorage):
    """One rank's Mooncake client. Thread-safe; close() waits for calls in flight."""

    def __init__(self, config: MooncakeConfig) -> None:
        self.config = config
        self.stats = MooncakeStats()
        self.zero_copy = False
        self._regions: list[tuple[int, int, torch.Tensor]] = []  # (start, end, keep-alive)
        self._cv = threading.Condition()
        self._inflight = 0
        self._closed = True  # until setup succeeds: no data call may reach the client
        self._store: Any = None

        address = config.master_address
        host, port = split_address(address)
        _set_env_defaults(config)  # read by setup(); exported values and the first client win
        store_mod = _import_store()
        if config.probe_timeout_s > 0:
            try:
                socket.create_connection((host, port), timeout=config.probe_timeout_s).close()
            except OSError as e:
                reason = e.strerror or type(e).__name__
                raise StorageError(f"Mooncake master {address} unreachable ({reason})") from None
        store = store_mod.MooncakeDistributedStore()
        try:
            rc = store.setup(
                config.local_hostname,
                config.metadata_server,
                config.global_segment_size,
                config.local_buffer_size,
                config.protocol,
                config.device_name,
                address,
            )
        except Exception as e:  # bad arguments surface as TypeError/RuntimeError
            raise StorageError(f"Mooncake setup against master {address} failed: {e}") from None
        if rc != 0:
            with contextlib.suppress(Exception):
                store.close()
            raise StorageError(f"Mooncake master {address} unreachable (setup returned {rc})")
        self._store = store
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    @contextlib.contextmanager
    def _op(self) -> Iterator[bool]:
        """Marks a data call in flight; yields False once closed (the call must not run)."""
        with self._cv:
            if self._closed:
                ok = False
            else:
                self._inflight += 1
                ok = True
        try:
            yield ok
        finally:
            if ok:
                with self._cv:
                    self._inflight -= 1
                    if self._inflight == 0:
                        self._cv.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the client once; later data calls return misses.

        Mooncake crashes the process on any call after close(), so this waits for calls in
        flight first. Takes 1-2 s (Mooncake's heartbeat). Objects this client hosts in its
        segment are lost with it.
        """
        with self._cv:
            if self._closed:
                return
            self._closed = True
            drained = self._cv.wait_for(
                lambda: self._inflight == 0, timeout=self.config.close_timeout_s
            )
        store, self._store = self._store, None
        if not drained:
            # Closing now could crash the calls still running; leak the client instead.
            logger.warning(
                "Mooncake client not closed: calls still in flight after %.0f s",
                self.config.close_timeout_s,
            )
            return
        try:
            rc = store.close()
            if rc != 0:
                logger.debug("Mooncake close returned %s", rc)
        except Exception as e:
            logger.debug("Mooncake close raised %s", e)

    def health_check(self) -> int:
        """Mooncake's health code: 0 healthy, 1 closed, 2 master unreachable."""
        with self._op() as ok:
            if not ok:
                return 1
            try:
                return int(self._store.health_check())
            except Exception as e:
                logger.debug("Mooncake health_check raised %s", e)
                return 2

    # ---------------------------------------------------------------- zero copy

    def register_mem_pool_host(self, buffer: torch.Tensor) -> None:
        """Register the host KV pool so pages inside it move without a bytes copy."""
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise StorageError("register_mem_pool_host needs a contiguous CPU tensor")
        start = buffer.data_ptr()
        nbytes = buffer.numel() * buffer.element_size()
        if nbytes == 0 or any(s <= start and start + nbytes <= e for s, e, _ in self._regions):
            return
        with self._op() as ok:
            if not ok:
                raise StorageError("register_mem_pool_host on a closed Mooncake client")
            try:
                rc = self._store.register_buffer(start, nbytes)
            except Exception as e:
                raise StorageError(f"Mooncake register_buffer raised {e}") from None
        if rc != 0:
            raise StorageError(f"Mooncake register_buffer({nbytes} bytes) returned {rc}")
        self._regions.append((start, start + nbytes, buffer))
        self.zero_copy = True

    def unregister_mem_pool_host(self, buffer: torch.Tensor) -> None:
        """Forget a host pool registered earlier, so a client outliving its cache frees it."""
        start = buffer.data_ptr()
        keep = [r for r in self._regions if r[0] != start]
        if len(keep) == len(self._regions):
            return
        with self._op() as ok:
            if ok:
                try:
                    rc = self._store.unregister_buffer(start)
                    if rc != 0:
                        logger.debug("Mooncake unregister_buffer returned %s", rc)
                except Exception as e:
                    logger.debug("Mooncake unregister_buffer raised %s", e)
        self._regions = keep
        self.zero_copy = bool(keep)

    def remove_prefix(self, prefix: str) -> int:
        """Drop every object whose key starts with `prefix` (a finished run's keys), leases
        ignored; the number removed, or a negative Mooncake code."""
        import re

        with self._op() as ok:
            if not ok:
                return 0
            try:
                return int(self._store.remove_by_regex("^" + re.escape(prefix), True))
            except Exception as e:
                logger.debug("Mooncake remove_by_regex raised %s", e)
                return -1

    def _registered(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True when every tensor lies inside one registered region (zero-copy is safe)."""
        return self._spans(tensors) is not None

    # ---------------------------------------------------------------- data calls

    def _is_exist(self, keys: list[str]) -> list[int]:
        """Mooncake's per-key 1 / 0 / -1; all -1 when the call fails outright."""
        try:
            codes = list(self._store.batch_is_exist(keys))
        except Exception as e:
            logger.debug("Mooncake batch_is_exist raised %s", e)
            return [-1] * len(keys)
        if len(codes) != len(keys):
            logger.debug("Mooncake batch_is_exist returned %s for %d keys", codes, len(keys))
            return [-1] * len(keys)
        return [int(c) for c in codes]

    def batch_exists(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with self._op() as ok:
            if not ok:
                return 0
            codes = self._is_exist(list(keys))
        hits = 0
        for c in codes:
            if c != 1:  # 0 missing, -1 failure: either way the prefix stops here
                break
            hits += 1
        if hits < len(codes) and codes[hits] < 0:
            self.stats.add(failed=1)
        return hits

    def _spans(self, tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]] | None:
        """(pointers, byte sizes) when every tensor lies inside one registered region, so the
        zero-copy calls can take them as they are; else None (the bytes path).

        One pass over plain attributes: on the prefetch path this runs once per batch, and
        building byte views first cost as much as a small transfer."""
        regions = self._regions
        if not regions:
            return None
        ptrs: list[int] = []
        sizes: list[int] = []
        for t in tensors:
            if not t.is_contiguous() or t.is_cuda:
                return None
            p = t.data_ptr()
            n = t.numel() * t.element_size()
            for s, e, _ in regions:
                if s <= p and p + n <= e:
                    break
            else:
                return None
            ptrs.append(p)
            sizes.append(n)
        return ptrs, sizes

    def batch_get(self, keys: Sequence[str], targets: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(targets):
            raise ValueError(f"{len(keys)} keys but {len(targets)} targets")
        if not keys:
            return []
        spans = self._spans(targets)
        views = [as_bytes(t) for t in targets] if spans is None else []  # raises if strided
        with self._op() as ok:
            if not ok:
                return [False] * len(keys)
            if spans is not None:
                out = self._get_into(list(keys), *spans)
                self.stats.add(zero_copy_get=len(keys))
            else:
                out = self._get_bytes(list(keys), views)
                self.stats.add(bytes_get=len(keys))
        return out

    def batch_get_into(self, keys: Sequence[str], ptrs: Sequence[int],
                       sizes: Sequence[int]) -> list[bool]:
        """Read straight into registered host memory (the host pool's page parts); misses
        where the memory is not registered (any more): Mooncake would write anywhere."""
        if not len(keys) == len(ptrs) == len(sizes):
            raise ValueError(f"{len(keys)} keys, {len(ptrs)} pointers, {len(sizes)} sizes")
        if not keys:
            return []
        lo, hi = min(ptrs), max(p + n for p, n in zip(ptrs, sizes, strict=True))
        with self._op() as ok:
            if not ok or not any(s <= lo and hi <= e for s, e, _ in self._regions):
                return [False] * len(keys)
            out = self._get_into(list(keys), list(ptrs), list(sizes))
            self.stats.add(zero_copy_get=len(keys))
        return out

    def _get_into(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[bool]:
        try:
            codes = list(self._store.batch_get_into(keys, ptrs, sizes))
        except Exception as e:
            logger.debug("Mooncake batch_get_into raised %s", e)
            codes = []
        if len(codes) != len(keys):
            self.stats.add(failed=len(keys))
            return [False] * len(keys)
        # A positive code is the number of bytes read: anything but the target's size
        # (a shorter object) is a mismatch, not a page.
        out = [int(c) == n for c, n in zip(codes, sizes, strict=True)]
        bad = [
            (k, c) for k, c, good in zip(keys, codes, out, strict=True) if not good and c != -704
        ]
        if bad:
            logger.debug("Mooncake batch_get_into failures: %s", bad[:4])
            self.stats.add(failed=len(bad))
        return out

    def _get_bytes(self, keys: list[str], views: list[torch.Tensor]) -> list[bool]:
        try:
            blobs = list(self._store.get_batch(keys))
        except Exception as e:
            logger.debug("Mooncake get_batch raised %s", e)
            blobs = []
        if len(blobs) != len(keys):
            self.stats.add(failed=len(keys))
            return [False] * len(keys)
        out = []
        for blob, dst in zip(blobs, views, strict=True):
            # A miss and a failure both come back as b"" (never None).
            if not blob or len(blob) != dst.numel():
                out.append(False)
                continue
            memoryview(dst.numpy())[:] = blob  # one copy, straight into the target
            out.append(True)
        return out

    def batch_set(self, keys: Sequence[str], values: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if not keys:
            return []
        spans = self._spans(values)
        views = [as_bytes(v) for v in values] if spans is None else []
        with self._op() as ok:
            if not ok:
                return [False] * len(keys)
            codes = self._is_exist(list(keys))
            # Present keys count as stored (write-once). A failed check (-1) is not written:
            # the master is failing, and a put would only add another multi-second timeout.
            out = [c == 1 for c in codes]
            todo = [i for i, c in enumerate(codes) if c == 0]
            self.stats.add(skipped_existing_set=sum(out), failed=sum(c < 0 for c in codes))
            if todo:
                todo_keys = [keys[i] for i in todo]
                if spans is not None:
                    stored = self._put_from(todo_keys, [spans[0][i] for i in todo],
                                            [spans[1][i] for i in todo])
                    self.stats.add(zero_copy_set=len(todo))
                else:
                    stored = self._put_bytes(todo_keys, [views[i] for i in todo])
                    self.stats.add(bytes_set=len(todo))
                for i, good in zip(todo, stored, strict=True):
                    out[i] = good
        return out

    @staticmethod
    def _stored(code: int) -> bool:
        return code in (0, OBJECT_ALREADY_EXISTS)  # another writer won the race: stored

    def _put_from(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[bool]:
        try:
            codes = list(self._store.batch_put_from(keys, ptrs, sizes))
        except Exception as e:
            logger.debug("Mooncake batch_put_from raised %s", e)
            codes = []
        if len(codes) != len(keys):
            self.stats.add(failed=len(keys))
            return [False] * len(keys)
        out = [self._stored(int(c)) for c in codes]
        if not all(out):
            logger.debug("Mooncake batch_put_from codes: %s", codes)
            self.stats.add(failed=out.count(False))
        return out

    def _put_bytes(self, keys: list[str], views: list[torch.Tensor]) -> list[bool]:
        out = []
        for key, v in zip(keys, views, strict=True):
            try:
                rc = int(self._store.put(key, v.numpy()))
            except Exception as e:
                logger.debug("Mooncake put %s raised %s", key, e)
                rc = -1
            good = self._stored(rc)
            if not good:
                logger.debug("Mooncake put %s returned %s", key, rc)
                self.stats.add(failed=1)
            out.append(good)
        return out
