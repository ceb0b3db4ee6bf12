"""The one interface every L3 backend implements (SGLang's HiCacheStorage, reduced)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class StorageError(RuntimeError):
    """A backend call failed (not a miss): the caller treats the pages as not transferred."""


class HiCacheStorage(ABC):
    """One rank's client of an L3 store.

    Keys are strings built by `reference.hashing.storage_key`. Values are contiguous CPU
    tensors (one K or V part of one page); backends move their raw bytes and never look inside.
    Writes are write-once, like Mooncake's `put`: setting an existing key keeps the old value
    and counts as success.
    """

    #: backends that read straight into registered host memory set this
    zero_copy: bool = False

    def register_mem_pool_host(self, buffer: torch.Tensor) -> None:  # noqa: B027
        """Let a zero-copy backend register the host pool's memory once, up front."""

    @abstractmethod
    def batch_exists(self, keys: Sequence[str]) -> int:
        """Length of the longest prefix of `keys` that all exist (0 on any failure)."""

    @abstractmethod
    def batch_get(self, keys: Sequence[str], targets: Sequence[torch.Tensor]) -> list[bool]:
        """Copy each key's bytes into the matching target; False where missing or failed."""

    @abstractmethod
    def batch_set(self, keys: Sequence[str], values: Sequence[torch.Tensor]) -> list[bool]:
        """Store each value under its key; True where stored or already present."""

    def batch_get_into(self, keys: Sequence[str], ptrs: Sequence[int],
                       sizes: Sequence[int]) -> list[bool]:
        """Zero-copy backends only (`zero_copy` True): read each key straight into registered
        host memory at `ptrs[i]`, `sizes[i]` bytes (Mooncake's call, as SGLang's
        `batch_get_v1` makes it from the host pool's `get_page_buffer_meta`)."""
        raise NotImplementedError(f"{type(self).__name__} does not read zero-copy")

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def close(self) -> None:  # noqa: B027
        """Release client resources; the store's data may outlive this client."""


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor, the unit every backend moves."""
    if not t.is_contiguous():
        raise ValueError("storage values must be contiguous")
    return t.view(-1).view(torch.uint8)
