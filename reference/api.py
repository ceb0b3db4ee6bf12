"""The one narrow door the harness uses: build one rank's scheduler + cache, and its seams."""

from __future__ import annotations

import torch

from reference.hashing import storage_tp_rank
from reference.hiradix_cache import CacheConfig, HiRadixCache, RankInfo
from reference.observer import NULL_OBSERVER, Decision, Observer, StorageAccess
from reference.pacing import FREE_RUNNING, Pacer
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
from reference.sync import Collectives, ParallelGroups, TorchCollectives, sync_rank_sets
from reference.variants import KNOWN, VARIANTS, check_variant, effective_configuration

__all__ = [
    "CacheConfig", "Collectives", "DEFAULT_PROFILE", "DP_ATTENTION_CHOICES", "Decision", "KNOWN",
    "MiniScheduler", "Observer", "PROFILES", "Pacer", "ParallelGroups", "ProtocolProfile",
    "RankInfo", "RequestOutcome", "StorageAccess", "StorageError", "TorchCollectives",
    "UnknownProfileError", "VARIANTS", "effective_configuration", "get_profile", "open_rank",
    "storage_tp_rank", "sync_rank_sets",
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
