"""SGLang's own MooncakeStore behind the Schedule's gates and faults (built by SGLang's
StorageBackendFactory under the name "mooncake", so the controller takes its zero-copy path).

Imported lazily by the factory, after the shim. Everything SGLang's store does runs unchanged:
its config parsing, `setup` with the arguments it computes, warm-up, key naming (tag prefix,
`{hash}_{tp}_k|v`), exist checks before puts, zero-copy puts and gets into the host pool it
registered. Only the client's lifetime is pooled (mooncake.SharedClient). The recorded keys are
the ones SGLang passed to the Mooncake client; page checksums are over the bytes it moved.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sglang.srt.mem_cache.storage.mooncake_store.mooncake_store import MooncakeStore

from scenarios.sut.sglang import mooncake, rank


def _sum_at(ptr: int, size: int) -> str:
    return mooncake._blake(ctypes.string_at(ptr, size))


class GatedMooncakeStore(MooncakeStore):
    """MHA pages only (MLA Schedules are not driven on SGLang): two keys per page, k and v."""

    def __init__(self, storage_config: Any = None, mem_pool: Any = None) -> None:
        run = rank.CURRENT
        assert run is not None, "GatedMooncakeStore built outside a cpcheck run"
        self.run = run
        self._calls = threading.local()
        run.key_tp = storage_config.tp_rank
        # SGLang makes its client with `MooncakeDistributedStore()` from mooncake.store (read
        # at construction: in __init__ up to 0.5.9, in _import_mooncake_store later): hand it
        # the worker's shared client for the length of the constructor
        import mooncake.store as mstore

        real = mstore.MooncakeDistributedStore
        client = mooncake.shared_client(run.mooncake_master, real)
        mstore.MooncakeDistributedStore = functools.partial(lambda c: c, client)
        try:
            super().__init__(storage_config, mem_pool)
        finally:
            mstore.MooncakeDistributedStore = real

    # -- what SGLang passes to the client, seen per calling thread ----------------------------
    @contextmanager
    def _seen(self) -> Iterator[list]:
        self._calls.log = log = []
        try:
            yield log
        finally:
            self._calls.log = None

    def _note(self, call: str, keys: list[str], out: Any) -> None:
        log = getattr(self._calls, "log", None)
        if log is not None:
            log.append((call, list(keys), list(out)))

    def _batch_exist(self, key_strs: list[str]) -> list[int]:
        out = super()._batch_exist(key_strs)
        self._note("exist", key_strs, out)
        return out

    def _get_batch_zero_copy_impl(self, key_strs: list[str], buffer_ptrs: list[int],
                                  buffer_sizes: list[int]) -> list[int]:
        out = super()._get_batch_zero_copy_impl(key_strs, buffer_ptrs, buffer_sizes)
        self._note("get", key_strs, out)
        return out

    def _put_batch_zero_copy_impl(self, key_strs: list[str], buffer_ptrs: list[int],
                                  buffer_sizes: list[int]) -> list[int]:
        out = super()._put_batch_zero_copy_impl(key_strs, buffer_ptrs, buffer_sizes)
        self._note("put", key_strs, out)
        return out

    # -- recording --------------------------------------------------------------------------
    def _seq(self, call: str) -> int:
        with self.run.lock:
            s = self.run.calls[call]
            self.run.calls[call] += 1
            return s

    def _named(self, keys: list[str]) -> list[str]:
        """SGLang's names for keys it never sent (a faulted call): tag, hash, tp rank, part."""
        tag = f"{self.extra_backend_tag}_" if self.extra_backend_tag is not None else ""
        return [f"{tag}{k}_{self.mha_suffix}_{p}" for k in keys for p in "kv"]

    def _record(self, op: str, names: list[str], page_ok: list[bool], sums: list[str]) -> None:
        oks = [page_ok[i // 2] for i in range(len(names))]
        with self.run.lock:
            self.run.storage.append([op, names, oks, [s if o else "" for s, o in
                                                      zip(sums, oks, strict=True)]])

    def _sums(self, host_indices: Any) -> list[str]:
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        return [_sum_at(p, s) for p, s in zip(ptrs, sizes, strict=True)]

    @staticmethod
    def _sent(log: list, call: str, n: int, fallback: list[str]) -> list[str]:
        for c, keys, _ in log:
            if c == call and len(keys) == n:
                return keys
        return fallback

    # -- the three calls the controller makes -------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        seq = self._seq("exists")
        if self.run.pacer.fail("exists", seq):
            self._record("exists", self._named(keys), [False] * len(keys), [""] * 2 * len(keys))
            return 0
        with self._seen() as log:
            hits = super().batch_exists(keys, extra_info)
        names = self._sent(log, "exist", 2 * len(keys), self._named(keys))
        self._record("exists", names, [i < hits for i in range(len(keys))],
                     [""] * len(names))
        return hits

    def batch_get_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None
                     ) -> list[bool]:
        gates = self.run.gates
        gates.before("get")
        try:
            seq = self._seq("get")
            if self.run.pacer.fail("get", seq):
                self._record("get", self._named(keys), [False] * len(keys),
                             [""] * 2 * len(keys))
                return [False] * len(keys)
            with self._seen() as log:
                out = super().batch_get_v1(keys, host_indices, extra_info)
            names = self._sent(log, "get", 2 * len(keys), self._named(keys))
            self._record("get", names, [bool(o) for o in out], self._sums(host_indices))
            return out
        finally:
            gates.after("get")

    def batch_set_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None
                     ) -> list[bool]:
        gates = self.run.gates
        gates.before("set")
        try:
            seq = self._seq("set")
            if self.run.pacer.fail("set", seq):
                self._record("set", self._named(keys), [False] * len(keys),
                             [""] * 2 * len(keys))
                return [False] * len(keys)
            with self._seen() as log:
                out = super().batch_set_v1(keys, host_indices, extra_info)
            # batch_set_v1 asks which keys exist (all of them) before putting the missing ones
            names = self._sent(log, "exist", 2 * len(keys), self._named(keys))
            self._record("set", names, [bool(o) for o in out], self._sums(host_indices))
            return out
        finally:
            gates.after("set")

    def clear(self) -> bool:  # never remove_all on a master other runs may share
        return True

    def get_stats(self) -> None:
        return None
