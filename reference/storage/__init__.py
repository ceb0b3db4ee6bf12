"""L3 storage backends behind one interface: in-memory, file, Mooncake."""

from reference.storage.base import HiCacheStorage, StorageError

__all__ = ["HiCacheStorage", "StorageError"]
