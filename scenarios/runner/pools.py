"""An executor's live rank pools, one per key (a layout): the bookkeeping both SUTs share."""

from __future__ import annotations

import contextlib
from typing import Any


def drop_pool(pools: dict[str, Any], key: str, quietly: bool = False) -> None:
    """Close the pool under `key` and forget it: a run that failed on it leaves gloo groups
    that cannot be trusted. `quietly`: a pool that fails to close is forgotten all the same."""
    pool = pools.get(key)
    if pool is None:
        return
    if quietly:
        with contextlib.suppress(Exception):
            pool.close()
    else:
        pool.close()
    pools.pop(key, None)


def close_pools(pools: dict[str, Any]) -> None:
    """Close every pool (quietly: the executor is going away) and forget them."""
    for key in list(pools):
        drop_pool(pools, key, quietly=True)
    pools.clear()
