"""Directory-backed L3 store: one file per key, shared by processes and across restarts.

Writes are atomic (a temp file in the same directory, then a hard link or rename onto the
final name), so a reader never sees a half-written page, and write-once (the first value
stored under a key wins), like Mooncake's `put`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from reference.storage.base import HiCacheStorage, as_bytes

logger = logging.getLogger(__name__)

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_SUFFIX = ".kv"
_TMP_PREFIX = ".tmp-"  # sanitised names never start with "." so temp files never collide
_MAX_NAME = 200  # well under the usual 255-byte limit, leaving room for the suffix


def key_to_filename(key: str) -> str:
    """An injective, path-safe file name for `key`.

    Characters outside [A-Za-z0-9_-] (including "." and "/") become %XX escapes of their
    UTF-8 bytes, so no key can name a directory, a hidden file or another key's file.
    Over-long names fall back to a SHA-256 of the key.
    """
    parts = []
    for ch in key:
        if ch in _SAFE:
            parts.append(ch)
        else:
            parts.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    name = "".join(parts) or "%E"  # "%E" + "." is no escape: no other key maps here
    if len(name) > _MAX_NAME:
        # "%" cannot appear unescaped above, so "%H" never collides with a short name.
        name = "%H" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return name + _SUFFIX


class FileStorage(HiCacheStorage):
    """One directory per store; any number of clients (threads or processes) may share it."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._closed = False

    def path_for(self, key: str) -> Path:
        return self.root / key_to_filename(key)

    def batch_exists(self, keys: Sequence[str]) -> int:
        if self._closed:
            return 0
        for i, key in enumerate(keys):
            if not self.path_for(key).is_file():
                return i
        return len(keys)

    def batch_get(self, keys: Sequence[str], targets: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(targets):
            raise ValueError(f"{len(keys)} keys but {len(targets)} targets")
        if self._closed:
            return [False] * len(keys)
        return [self._get_one(k, t) for k, t in zip(keys, targets, strict=True)]

    def _get_one(self, key: str, target: torch.Tensor) -> bool:
        dst = as_bytes(target)
        try:
            with open(self.path_for(key), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != dst.numel():
                    logger.debug("file %s: size %d != target %d", key, size, dst.numel())
                    return False
                if size == 0:
                    return True
                view = memoryview(dst.numpy())
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        return False
                    got += n
                return True
        except FileNotFoundError:
            return False
        except OSError as e:
            logger.debug("file get %s failed: %s", key, e)
            return False

    def batch_set(self, keys: Sequence[str], values: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if self._closed:
            return [False] * len(keys)
        out = [self._set_one(k, v) for k, v in zip(keys, values, strict=True)]
        if self.fsync and any(out):
            self._fsync_dir()
        return out

    def _set_one(self, key: str, value: torch.Tensor) -> bool:
        final = self.path_for(key)
        if final.is_file():
            return True  # write-once: keep the first value
        src = as_bytes(value)
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
            with os.fdopen(fd, "wb") as f:
                if src.numel():
                    f.write(memoryview(src.numpy()))
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            try:
                # link() fails if the key appeared meanwhile: the first writer wins even
                # when several processes store the same key at once.
                os.link(tmp, final)
            except FileExistsError:
                pass
            except OSError:
                # Filesystems without hard links: an atomic rename (last writer wins, but
                # the bytes for one key are the same on every writer).
                os.replace(tmp, final)
                tmp = None
            return True
        except OSError as e:
            logger.debug("file set %s failed: %s", key, e)
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        """Detach this client; the files stay for later clients."""
        self._closed = True
