"""The storage backend SGLang builds through its StorageBackendFactory during a cpcheck run.

Imported lazily by the factory (after the shim), so it may subclass SGLang's own file backend.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheFile

from scenarios.sut.sglang import pools, rank


def _sum(t: torch.Tensor | None) -> str:
    if t is None:
        return ""
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(),
                           digest_size=8).hexdigest()


class GatedStorage(HiCacheFile):
    """SGLang's file backend behind the Schedule's gates and faults, recording every call.

    Keys are recorded in Mooncake's naming (`{hash}_{tp}_k` / `_v`, tp = the storage config's
    tp rank, which is what SGLang puts in every backend's key or file name; `_{pp}` after it
    with PP; MLA `{hash}__k`, or `{hash}_{pp}_k` with PP: pools.key_tail)."""

    def __init__(self, storage_config: Any, *a: Any, **k: Any) -> None:
        run = rank.CURRENT
        assert run is not None, "GatedStorage built outside a cpcheck run"
        self.run = run
        run.key_tp = storage_config.tp_rank
        self.key_tail, self.parts = pools.key_tail(storage_config)
        super().__init__(storage_config, file_path=run.storage_dir)
        self.file_path = run.storage_dir

    def _seq(self, call: str) -> int:
        with self.run.lock:
            s = self.run.calls[call]
            self.run.calls[call] += 1
            return s

    def _record(self, op: str, keys: list[str], ok: list[bool], pages: list) -> None:
        tail, parts = self.key_tail, self.parts
        names, oks, sums = [], [], []
        for key, good, page in zip(keys, ok, pages, strict=True):
            halves = (page.reshape(len(parts), -1) if page is not None
                      else (None,) * len(parts))
            for part, half in zip(parts, halves, strict=True):
                names.append(f"{key}{tail}_{part}")
                oks.append(good)
                sums.append(_sum(half) if good else "")
        with self.run.lock:
            self.run.storage.append([op, names, oks, sums])

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        seq = self._seq("exists")
        if self.run.pacer.fail("exists", seq):
            hits = 0
        else:
            hits = 0
            for key in keys:
                if not super().exists(key):
                    break
                hits += 1
        self._record("exists", keys, [i < hits for i in range(len(keys))], [None] * len(keys))
        return hits

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
                  ) -> list:
        gates = self.run.gates
        gates.before("get")
        try:
            seq = self._seq("get")
            if self.run.pacer.fail("get", seq):
                out: list = [None] * len(keys)
            else:
                out = super().batch_get(keys, target_locations)
            self._record("get", keys, [o is not None for o in out], list(out))
            return out
        finally:
            gates.after("get")

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        gates = self.run.gates
        gates.before("set")
        try:
            seq = self._seq("set")
            ok = not self.run.pacer.fail("set", seq) and super().batch_set(keys, values)
            self._record("set", keys, [ok] * len(keys), list(values))
            return ok
        finally:
            gates.after("set")

    def clear(self) -> bool:
        return True

    def get_stats(self) -> None:
        return None


