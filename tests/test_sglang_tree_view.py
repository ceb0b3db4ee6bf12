"""The tree view (scenarios/sut/sglang/tree_view.py): the checker's tree digest from a walk of
`root_node`, or, for the Rust tree core that cannot be walked (0.5.21+), from the core's own KV
cache events. Unit tests with stand-ins named as SGLang's event classes (no SGLang needed); the
`sglang`-marked runs of 0.5.21 .. 0.5.23 in tests/test_sglang_today.py drive the real core."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scenarios.sut.sglang import server_cache, tree_view


class BlockStored(SimpleNamespace):
    pass


class BlockRemoved(SimpleNamespace):
    pass


class AllBlocksCleared(SimpleNamespace):
    pass


def _stored(hashes: list[int], medium: str, page: int = 2) -> BlockStored:
    return BlockStored(block_hashes=hashes, token_ids=list(range(page * len(hashes))),
                       block_size=page, medium=SimpleNamespace(value=medium))


class _RustLikeCache:
    """What UnifiedRadixCache with the Rust tree core offers: `root_node` raises, events are
    taken from the tree core's queue (on only when the run asked for them)."""

    def __init__(self, events_on: bool) -> None:
        self.queue: list = []
        self.tree_core = SimpleNamespace(kv_events=SimpleNamespace(enabled=events_on))

    @property
    def root_node(self) -> None:
        raise NotImplementedError("root_node: not yet ported to the Rust tree core")

    def take_events(self) -> list:
        out, self.queue = self.queue, []
        return out


def test_the_mirror_follows_stores_removes_and_clears_per_medium() -> None:
    cache = _RustLikeCache(events_on=True)
    view = tree_view.for_cache(cache)
    assert isinstance(view, tree_view.EventMirror)
    empty = view.digest()
    cache.queue += [_stored([1, 2], tree_view.DEVICE)]
    on_device = view.digest()
    assert view.tokens() == (4, 0) and on_device != empty
    # a write-through backs the same pages up on the host: same pages, another medium
    cache.queue += [_stored([1, 2], tree_view.HOST)]
    backed = view.digest()
    assert view.tokens() == (4, 4) and backed != on_device
    # device eviction of the second page: host copy stays
    cache.queue += [BlockRemoved(block_hashes=[2], medium=tree_view.DEVICE)]
    assert view.tokens() == (2, 4) and view.digest() not in (backed, on_device)
    # the same residency reached in another order has the same digest (a set, not a log)
    other = _RustLikeCache(events_on=True)
    other.queue += [_stored([1], tree_view.DEVICE), _stored([2, 1], tree_view.HOST)]
    assert tree_view.for_cache(other).digest() == view.digest()
    cache.queue += [AllBlocksCleared()]
    assert view.tokens() == (0, 0) and view.digest() == empty


def test_an_unknown_event_is_a_harness_error_not_a_silent_skip() -> None:
    cache = _RustLikeCache(events_on=True)
    cache.queue.append(SimpleNamespace())
    with pytest.raises(ValueError, match="unknown KV cache event"):
        tree_view.for_cache(cache).digest()


def test_a_walkable_tree_is_walked() -> None:
    leaf = SimpleNamespace(key=[3, 4], value=None, host_value=object(), children={})
    mid = SimpleNamespace(key=[1, 2], value=object(), host_value=None, children={3: leaf})
    cache = SimpleNamespace(root_node=SimpleNamespace(children={1: mid}))
    view = tree_view.for_cache(cache)
    assert isinstance(view, tree_view.NodeWalk) and view.tokens() == (2, 2)
    before = view.digest()
    leaf.value = object()  # loaded back: the digest sees it
    assert view.digest() != before and view.tokens() == (4, 2)


def test_a_tree_neither_walkable_nor_reporting_events_is_a_missing_seam() -> None:
    """The seam broken: the Rust tree core built without KV cache events (what the run asks
    for in `wants_events`) cannot be seen, and the class is not driven (125, naming it)."""
    assert tree_view.for_cache(_RustLikeCache(events_on=False)) is None
    need = server_cache.SEAMS + server_cache.HIT_QUEUE_SEAMS + server_cache.PER_BATCH_ACK_SEAMS
    for on in (True, False):
        cache = _RustLikeCache(events_on=on)
        cache.tree_core.insert_host = None
        for n in need:
            if n != "root_node":
                setattr(cache, server_cache.UNIFIED_NAMES.get(n, n).split(".")[-1], None)
        missing = server_cache.missing_seams(cache, hit_queue=True, timeout_policy=False)
        assert (missing == []) if on else (missing == [
            "root_node (or KV cache events from its tree core)"]), (on, missing)


def _fake_release(monkeypatch, annotation: str) -> None:
    """A stand-in `sglang.srt.mem_cache.radix_cache` whose RadixKey types `token_ids` as a
    release does (0.5.20: `List[int]`; 0.5.21+: `array[int]`)."""
    import sys
    import types

    ns: dict = {}
    exec(f"class RadixKey:\n    def __init__(self, token_ids: '{annotation}'):\n"
         "        self.token_ids = token_ids\n", ns)
    for name in ("sglang", "sglang.srt", "sglang.srt.mem_cache"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    mod = types.ModuleType("sglang.srt.mem_cache.radix_cache")
    mod.RadixKey = ns["RadixKey"]
    monkeypatch.setitem(sys.modules, "sglang.srt.mem_cache.radix_cache", mod)


def test_token_ids_are_typed_as_the_release_types_them(monkeypatch) -> None:
    """0.5.21+'s Rust tree core asserts `array('q')` token ids (a list read as a divergence
    [error] on every rank before); earlier releases keep lists."""
    from array import array

    from scenarios.sut.sglang import adapters

    _fake_release(monkeypatch, "array[int]")
    key = adapters.radix_key([1, 2, 3])
    assert isinstance(key.token_ids, array) and key.token_ids.typecode == "q"
    assert adapters.token_seq([4]) == array("q", [4])
    _fake_release(monkeypatch, "List[int]")
    assert adapters.radix_key([1, 2]).token_ids == [1, 2] and adapters.token_seq([4]) == [4]


def test_a_match_without_indices_reads_them_off_its_device_path() -> None:
    """0.5.22+ matches carry `device_prefix_len` only: the indices are the path's first ones."""
    import torch

    from scenarios.sut.sglang import adapters

    cache = SimpleNamespace(path_device_indices=lambda node: torch.arange(10, 18) if node == 7
                            else None)
    m = SimpleNamespace(device_prefix_len=4, last_device_node=7, host_hit_length=0)
    assert adapters.device_prefix_len(m) == 4
    assert adapters.device_indices(cache, m).tolist() == [10, 11, 12, 13]
    old = SimpleNamespace(device_indices=torch.arange(3), last_device_node=None)
    assert adapters.device_prefix_len(old) == 3 and adapters.device_indices(None, old).numel() == 3
