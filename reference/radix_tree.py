"""A radix tree over token pages with device / host / storage residency (HiRadixCache's tree).

Edges are whole pages. A node's `value` holds its device slots (None once evicted from L1),
`host_value` its host slots (None when not in L2), `backuped_storage` whether L3 holds it.
LRU order uses a logical clock so that every rank, given the same operations, evicts the same
nodes: wall-clock ties would make CP peers drift.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from reference.hashing import page_hashes

_EMPTY = torch.empty(0, dtype=torch.int64)


class TreeNode:
    _ids = itertools.count()

    def __init__(self, parent: TreeNode | None = None) -> None:
        self.id = next(TreeNode._ids)
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.key: tuple[int, ...] = ()
        self.hash_value: list[str] = []
        self.value: torch.Tensor | None = None
        self.host_value: torch.Tensor | None = None
        self.backuped_storage = False
        self.lock_ref = 0
        self.host_ref_counter = 0
        self.hit_count = 0  # for write_through_selective
        self.last_access = 0

    @property
    def evicted(self) -> bool:
        return self.value is None

    @property
    def backuped(self) -> bool:
        return self.host_value is not None

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, dev={not self.evicted}, host={self.backuped})"


@dataclass
class MatchResult:
    device_indices: torch.Tensor
    last_device_node: TreeNode
    last_host_node: TreeNode
    host_hit_length: int


class RadixTree:
    """Pages in, pages out; every length here is a multiple of page_size."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = TreeNode()
        self.root.lock_ref = 1
        self.root.value = _EMPTY
        self.root.host_value = _EMPTY
        self._clock = itertools.count(1)

    # -- lookup -----------------------------------------------------------------------------
    def _page_key(self, tokens: Sequence[int]) -> tuple[int, ...]:
        return tuple(tokens[: self.page_size])

    def _touch(self, node: TreeNode) -> None:
        node.last_access = next(self._clock)

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached prefix; device hits stop at the first evicted node, host hits go on."""
        tokens = tuple(tokens[: len(tokens) // self.page_size * self.page_size])
        node = self.root
        device_parts: list[torch.Tensor] = []
        last_device = last_host = self.root
        host_len = 0
        pos = 0
        device_done = False
        while pos < len(tokens):
            child = node.children.get(self._page_key(tokens[pos:]))
            if child is None:
                break
            n = self._common_len(child.key, tokens[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            self._touch(child)
            if not device_done and not child.evicted:
                device_parts.append(child.value)
                last_device = child
            else:
                device_done = True
                if child.backuped:
                    host_len += len(child.key)
                else:
                    break
            if child.backuped:  # SGLang's: the deepest matched node on host, not past it
                last_host = child
            node = child
            pos += n
        dev = torch.cat(device_parts) if device_parts else _EMPTY
        return MatchResult(dev, last_device, last_host, host_len)

    def _common_len(self, key: Sequence[int], tokens: Sequence[int]) -> int:
        ps = self.page_size
        n = 0
        while n < len(key) and n < len(tokens) and key[n : n + ps] == tuple(tokens[n : n + ps]):
            n += ps
        return n

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after n tokens; returns the new upper node (SGLang's _split_node)."""
        new = TreeNode(child.parent)
        new.key = child.key[:n]
        new.hash_value = child.hash_value[: n // self.page_size]
        new.value = None if child.value is None else child.value[:n]
        new.host_value = None if child.host_value is None else child.host_value[:n]
        new.backuped_storage = child.backuped_storage
        new.lock_ref = child.lock_ref
        new.host_ref_counter = child.host_ref_counter
        new.last_access = child.last_access
        new.hit_count = child.hit_count
        assert child.parent is not None
        child.parent.children[self._page_key(new.key)] = new
        child.parent = new
        child.key = child.key[n:]
        child.hash_value = child.hash_value[n // self.page_size :]
        child.value = None if child.value is None else child.value[n:]
        child.host_value = None if child.host_value is None else child.host_value[n:]
        new.children = {self._page_key(child.key): child}
        return new

    # -- insert -----------------------------------------------------------------------------
    def insert(
        self,
        tokens: Sequence[int],
        device_indices: torch.Tensor | None = None,
        host_indices: torch.Tensor | None = None,
        from_node: TreeNode | None = None,
        prior_hash: str | None = None,
        hits: list[TreeNode] | None = None,
    ) -> tuple[TreeNode, list[torch.Tensor]]:
        """Insert pages below `from_node` (root by default); returns the last node and the
        slots the caller passed that were already cached (the caller frees them).

        Exactly one of device_indices / host_indices is given: a device insert (a finished
        request) or a host insert (pages prefetched from storage). `hits` collects, in path
        order, the nodes SGLang's `insert` counts a hit on (`_inc_hit_count`): every node of
        the path that was on the device, and the new leaf; not one the insert refilled.
        """
        assert (device_indices is None) != (host_indices is None)
        tokens = tuple(tokens)
        assert len(tokens) % self.page_size == 0
        values = device_indices if device_indices is not None else host_indices
        assert values is not None and values.numel() == len(tokens)
        on_device = device_indices is not None
        node = from_node or self.root
        h = prior_hash if from_node is not None else None
        if node is not self.root and node.hash_value:
            h = node.hash_value[-1]
        duplicates: list[torch.Tensor] = []
        pos = 0
        while pos < len(tokens):
            child = node.children.get(self._page_key(tokens[pos:]))
            if child is None:
                new = TreeNode(node)
                new.key = tokens[pos:]
                new.hash_value = page_hashes(new.key, self.page_size, h)
                if on_device:
                    new.value = values[pos:].clone()
                else:
                    new.host_value = values[pos:].clone()
                node.children[self._page_key(new.key)] = new
                self._touch(new)
                if hits is not None:
                    hits.append(new)
                return new, duplicates
            n = self._common_len(child.key, tokens[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            seg = values[pos : pos + n]
            current = child.value if on_device else child.host_value
            if current is not None and torch.equal(current, seg):
                pass  # the caller's prefix is this node's own slots
            elif on_device and child.evicted:
                child.value = seg.clone()
            elif not on_device and not child.backuped:
                child.host_value = seg.clone()
            else:
                duplicates.append(seg)
            if hits is not None and current is not None:
                hits.append(child)
            self._touch(child)
            h = child.hash_value[-1]
            node = child
            pos += n
        return node, duplicates

    # -- locks ------------------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"lock_ref underflow on {node}")
            node.lock_ref -= 1
            node = node.parent  # type: ignore[assignment]

    def inc_host_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            node.host_ref_counter += 1
            node = node.parent  # type: ignore[assignment]

    def dec_host_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.host_ref_counter <= 0:
                raise RuntimeError(f"host_ref underflow on {node}")
            node.host_ref_counter -= 1
            node = node.parent  # type: ignore[assignment]

    # -- eviction ---------------------------------------------------------------------------
    def nodes(self) -> Iterator[TreeNode]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def evict_device(self, num_tokens: int, free_device: Callable[[torch.Tensor], None]) -> int:
        """Drop device copies of unlocked nodes with no device-resident child, LRU first.

        A node backed up on host keeps its place in the tree (`_evict_backuped`); one that is
        not is deleted (`_evict_regular`, write-through means this only happens before its
        host copy exists, and such a node's host slots are not held anywhere).
        A node that is not backed up but is host-protected (`host_ref_counter`, a prefetch
        will insert below it) stays: deleting it would detach the prefetched pages.
        """
        evicted = 0
        while evicted < num_tokens:
            cands = [
                n for n in self.nodes()
                if not n.evicted and n.lock_ref == 0
                and all(c.evicted for c in n.children.values())
                and (n.backuped or n.host_ref_counter == 0)
            ]
            if not cands:
                break
            victim = min(cands, key=lambda n: (n.last_access, n.id))
            assert victim.value is not None
            free_device(victim.value)
            evicted += victim.value.numel()
            victim.value = None
            if not victim.backuped and not victim.children:
                self._delete(victim)
        return evicted

    def evict_host(self, num_tokens: int, free_host: Callable[[torch.Tensor], None]) -> int:
        """Drop host copies of device-evicted leaves that nothing holds, LRU first."""
        evicted = 0
        while evicted < num_tokens:
            cands = [
                n for n in self.nodes()
                if n.evicted and n.backuped and not n.children
                and n.host_ref_counter == 0 and n.lock_ref == 0
            ]
            if not cands:
                break
            victim = min(cands, key=lambda n: (n.last_access, n.id))
            assert victim.host_value is not None
            free_host(victim.host_value)
            evicted += victim.host_value.numel()
            victim.host_value = None
            self._delete(victim)
        return evicted

    def _delete(self, node: TreeNode) -> None:
        assert node.parent is not None and not node.children
        del node.parent.children[self._page_key(node.key)]

    # -- inspection -------------------------------------------------------------------------
    def digest(self) -> str:
        """A hash of the tree's shape and residency (not slot numbers), equal on agreeing ranks."""
        h = hashlib.sha256()

        def walk(node: TreeNode, depth: int) -> None:
            for k in sorted(node.children):
                c = node.children[k]
                h.update(
                    f"{depth}|{c.hash_value[-1][:16]}|{len(c.key)}|{int(not c.evicted)}"
                    f"|{int(c.backuped)}|{int(c.backuped_storage)}|{c.lock_ref}|{c.host_ref_counter};".encode()
                )
                walk(c, depth + 1)

        walk(self.root, 0)
        return h.hexdigest()[:16]

    def cached_tokens(self) -> dict[str, int]:
        dev = sum(n.value.numel() for n in self.nodes() if n.value is not None)
        host = sum(n.host_value.numel() for n in self.nodes() if n.host_value is not None)
        return {"device": dev, "host": host}
