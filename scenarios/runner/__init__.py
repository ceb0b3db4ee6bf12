"""Execute jobs on N ranks: a pool of long-lived torchrun workers (``RankPool``).

Names are loaded lazily (PEP 562) so that ``python -m scenarios.runner.worker`` does not import
the worker module twice, and importing this package does not import torch (the workers do).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scenarios.runner.torchrun_pool import (
        PoolNotRunningError,
        RankDiedError,
        RankInfo,
        RankJobError,
        RankPool,
        RankPoolConfigError,
        RankPoolError,
        RankPoolStartError,
        RankTimeoutError,
        job_name,
        max_ranks_here,
        pool_processes,
    )
    from scenarios.runner.worker import Diagnosis, RankContext, RankGroups, RankStatus

_WHERE = {
    **dict.fromkeys(
        [
            "PoolNotRunningError",
            "RankDiedError",
            "RankInfo",
            "RankJobError",
            "RankPool",
            "RankPoolConfigError",
            "RankPoolError",
            "RankPoolStartError",
            "RankTimeoutError",
            "job_name",
            "max_ranks_here",
            "pool_processes",
        ],
        "scenarios.runner.torchrun_pool",
    ),
    **dict.fromkeys(
        ["Diagnosis", "RankContext", "RankGroups", "RankStatus"], "scenarios.runner.worker"
    ),
}

__all__ = [
    "Diagnosis",
    "PoolNotRunningError",
    "RankContext",
    "RankDiedError",
    "RankGroups",
    "RankInfo",
    "RankJobError",
    "RankPool",
    "RankPoolConfigError",
    "RankPoolError",
    "RankPoolStartError",
    "RankStatus",
    "RankTimeoutError",
    "job_name",
    "max_ranks_here",
    "pool_processes",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'scenarios.runner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
