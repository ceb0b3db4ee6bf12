"""In-process L3 store: a dict of byte copies shared by every client of one namespace.

In the fast mode all ranks are threads of one process, so "shared storage" is simply one
dict per namespace string; a module lock makes it safe to use from every rank's IO threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from reference.storage.base import HiCacheStorage, as_bytes

logger = logging.getLogger(__name__)

# namespace -> key -> private uint8 copy. Values are never mutated after insertion
# (write-once), so readers may copy out of them without holding the lock.
_NAMESPACES: dict[str, dict[str, torch.Tensor]] = {}
_LOCK = threading.Lock()


def clear_namespace(namespace: str) -> None:
    """Forget every key of `namespace` (tests and the harness reset storage between runs)."""
    with _LOCK:
        _NAMESPACES.pop(namespace, None)


def namespace_keys(namespace: str) -> list[str]:
    """The keys currently stored in `namespace`, for checks that inspect the whole store."""
    with _LOCK:
        return list(_NAMESPACES.get(namespace, {}))


class MemoryStorage(HiCacheStorage):
    """A dict-backed store; instances with the same namespace see each other's keys."""

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self._closed = False

    def _table(self) -> dict[str, torch.Tensor]:
        # Looked up on every call (under _LOCK) so that clear_namespace takes effect at once
        # for clients created before it.
        return _NAMESPACES.setdefault(self.namespace, {})

    def batch_exists(self, keys: Sequence[str]) -> int:
        if self._closed:
            return 0
        with _LOCK:
            table = self._table()
            for i, key in enumerate(keys):
                if key not in table:
                    return i
        return len(keys)

    def batch_get(self, keys: Sequence[str], targets: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(targets):
            raise ValueError(f"{len(keys)} keys but {len(targets)} targets")
        if self._closed:
            return [False] * len(keys)
        with _LOCK:
            table = self._table()
            found = [table.get(key) for key in keys]
        out: list[bool] = []
        for value, target in zip(found, targets, strict=True):
            dst = as_bytes(target)
            if value is None or value.numel() != dst.numel():
                out.append(False)
                continue
            dst.copy_(value)
            out.append(True)
        return out

    def batch_set(self, keys: Sequence[str], values: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if self._closed:
            return [False] * len(keys)
        # Clone outside the lock: a private copy, so later writes to the caller's host pool
        # can never change what the store holds.
        copies = [as_bytes(v).clone() for v in values]
        with _LOCK:
            table = self._table()
            for key, copy in zip(keys, copies, strict=True):
                table.setdefault(key, copy)  # write-once: the first value wins
        return [True] * len(keys)

    def close(self) -> None:
        """Detach this client; the namespace's data stays for the other clients."""
        self._closed = True
