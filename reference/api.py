"""The one narrow door the harness uses: build one rank's scheduler + cache, and its seams.

Everything the harness (`scenarios/`, `benchmarks/`, harness tests) takes from `reference/` comes
from here; `lint-imports` (contracts in pyproject.toml) fails CI on a direct import of an
internal module. Besides `open_rank`: the two seams (pacing, observer), the variants, the
storage backends a rank may be given, the KV shape, the page hashing the keys derive from, and
the names the cache accepts (write / prefetch-stop policies, backends): the harness's CLI,
Schedules and generators take them from here, never spell their own.
"""

from __future__ import annotations

import torch

from reference.cache_controller import STOP_POLICIES, WRITE_POLICIES, HiCacheError
from reference.hashing import (
    TOKEN_ID_LIMIT,
    KeySuffix,
    backend_tag_prefix,
    namespace_seed,
    page_hash,
    page_hashes,
    storage_tp_rank,
)
from reference.hiradix_cache import AgreementTimeout, CacheConfig, HiRadixCache, RankInfo
from reference.memory_pool import KVShape
from reference.observer import (
    EFFECT_OF_KIND,
    NULL_OBSERVER,
    AckEffect,
    Decision,
    DrainEffect,
    Effect,
    HitsEffect,
    Observer,
    ProgressSeen,
    StorageAccess,
    effect_of,
)
from reference.pacing import FREE_RUNNING, FreeRunning, Pacer
from reference.profiles import (
    DEFAULT_PROFILE,
    DP_ATTENTION_CHOICES,
    PROFILES,
    ProtocolProfile,
    UnknownProfileError,
    get_profile,
)
from reference.scheduler import MiniScheduler, RequestOutcome
from reference.storage.base import HiCacheStorage, StorageError
from reference.storage.file import FileStorage
from reference.storage.memory import MemoryStorage, clear_namespace, namespace_keys
from reference.storage.mooncake import MooncakeConfig, MooncakeStorage
from reference.storage.mooncake import _import_store as import_mooncake_store
from reference.sync import Collectives, ParallelGroups, TorchCollectives, sync_rank_sets
from reference.variants import (
    KNOWN,
    VARIANTS,
    UnknownVariantError,
    check_variant,
    effective_configuration,
)

#: the storage backends a rank may be given (`HiCacheStorage` implementations below), by name
STORAGE_BACKENDS = ("memory", "file", "mooncake")

__all__ = [
    "AgreementTimeout", "CacheConfig", "Collectives", "DEFAULT_PROFILE", "DP_ATTENTION_CHOICES",
    "AckEffect", "Decision", "DrainEffect", "EFFECT_OF_KIND", "Effect", "FREE_RUNNING", "HitsEffect",
    "ProgressSeen", "effect_of", "FileStorage", "FreeRunning", "HiCacheError", "HiCacheStorage",
    "KNOWN", "KVShape", "KeySuffix", "MemoryStorage", "MiniScheduler", "MooncakeConfig",
    "MooncakeStorage", "NULL_OBSERVER", "Observer", "PROFILES", "Pacer", "ParallelGroups",
    "ProtocolProfile", "RankInfo", "RequestOutcome", "STOP_POLICIES", "STORAGE_BACKENDS",
    "StorageAccess", "StorageError", "TOKEN_ID_LIMIT", "TorchCollectives", "UnknownProfileError",
    "UnknownVariantError", "VARIANTS", "WRITE_POLICIES", "backend_tag_prefix", "check_variant",
    "clear_namespace",
    "effective_configuration", "get_profile", "import_mooncake_store", "namespace_keys",
    "namespace_seed", "open_rank", "page_hash", "page_hashes", "storage_tp_rank", "sync_rank_sets",
]


def open_rank(
    config: CacheConfig,
    rank: RankInfo,
    groups: ParallelGroups,
    collectives: Collectives,
    storage: HiCacheStorage | None = None,
    device: torch.device | None = None,
    pacer: Pacer = FREE_RUNNING,
    observer: Observer = NULL_OBSERVER,
) -> MiniScheduler:
    check_variant(config.variant)
    get_profile(config.protocol)
    cache = HiRadixCache(config, rank, groups, collectives, storage, device, pacer, observer)
    return MiniScheduler(cache)
