"""What the checker sees of a rank's radix tree: which token prefixes are on the device and on
the host, as one digest and two token counts.

Two ways to see it, through the tree's own API:

- `NodeWalk`: walk `cache.root_node`'s children (HiRadixCache, UnifiedRadixCache with its Python
  tree core);
- `EventMirror`: the Rust tree core (UnifiedRadixCache's default from 0.5.21) cannot be walked
  (`root_node` raises `NotImplementedError: not yet ported to the Rust tree core`), but it
  reports every residency change as SGLang's KV cache events (`BlockStored` / `BlockRemoved`
  per page and medium, `GPU` = device, `CPU_PINNED` = host: what a server publishes to its
  router with `--kv-events-config`). The mirror applies them in order: the pages live per
  medium, keyed by SGLang's chained block hash (a hash of the whole prefix).

Events are on only where the mirror is used (`wants_events`): nobody else drains their queue.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from scenarios.sut.sglang import adapters

#: KV event media (sglang.srt.disaggregation.kv_events.StorageMedium values)
DEVICE, HOST = "GPU", "CPU_PINNED"


def _hex(rows: list) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def walkable(cache: Any) -> bool:
    try:
        cache.root_node  # noqa: B018 (the Rust tree core raises from the property)
    except (AttributeError, NotImplementedError):
        return False
    return True


class NodeWalk:
    """Every node under the root: (its full token prefix, on device, on host)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def _rows(self) -> list:
        rows, stack = [], [(self.cache.root_node, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                full = prefix + tuple(adapters.token_ids(child.key))
                rows.append((full, adapters.on_device(child), adapters.on_host(child)))
                stack.append((child, full))
        return sorted(rows)

    def digest(self) -> str:
        return _hex(self._rows())

    def tokens(self) -> tuple[int, int]:
        dev = host = 0
        stack = [self.cache.root_node]
        while stack:
            for child in stack.pop().children.values():
                n = len(adapters.token_ids(child.key))
                dev += n if adapters.on_device(child) else 0
                host += n if adapters.on_host(child) else 0
                stack.append(child)
        return dev, host


class EventMirror:
    """The pages live per medium, from the tree core's own KV cache events, applied in order
    each time the tree is looked at (the events are drained from the core's queue)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.live: dict[str, dict[int, int]] = {DEVICE: {}, HOST: {}}  # hash -> page tokens

    def _medium(self, event: Any) -> str:
        return str(getattr(event.medium, "value", event.medium))

    def apply(self, events: list) -> None:
        for e in events:
            kind = type(e).__name__
            if kind == "BlockStored":
                live = self.live.setdefault(self._medium(e), {})
                size = e.block_size or len(e.token_ids)
                for i, h in enumerate(e.block_hashes):
                    live[h] = len(e.token_ids[i * size:(i + 1) * size])
            elif kind == "BlockRemoved":
                live = self.live.setdefault(self._medium(e), {})
                for h in e.block_hashes:
                    live.pop(h, None)
            elif kind == "AllBlocksCleared":
                for live in self.live.values():
                    live.clear()
            else:
                raise ValueError(f"unknown KV cache event {kind}")

    def _sync(self) -> None:
        self.apply(self.cache.take_events())

    def digest(self) -> str:
        self._sync()
        return _hex(sorted((medium, h) for medium, live in self.live.items() for h in live))

    def tokens(self) -> tuple[int, int]:
        self._sync()
        return sum(self.live[DEVICE].values()), sum(self.live[HOST].values())


def events_on(cache: Any) -> bool:
    """The tree core records KV cache events (the mirror's input)."""
    core = getattr(cache, "tree_core", None)
    recorder = getattr(core, "kv_events", None)
    return bool(getattr(recorder, "enabled", False)) and hasattr(cache, "take_events")


def for_cache(cache: Any) -> NodeWalk | EventMirror | None:
    """The view this cache offers, None when it offers neither (a missing seam)."""
    if walkable(cache):
        return NodeWalk(cache)
    if events_on(cache):
        return EventMirror(cache)
    return None


def wants_events(params: Any) -> Any:
    """`params` with KV cache events on where the release will build a tree core that cannot be
    walked (its registry selects a backend other than the Python one); unchanged elsewhere."""
    try:
        from sglang.srt.mem_cache.unified_cache.tree_core_registry import (
            select_tree_core_backend,
        )
    except ImportError:
        return params
    names = {f.name for f in dataclasses.fields(params)}
    if "enable_kv_cache_events" not in names or select_tree_core_backend(params) == "python":
        return params
    return dataclasses.replace(params, enable_kv_cache_events=True)
