"""Model-based tests of `reference.radix_tree.RadixTree`.

The tree is what CP peers must keep identical, and its slots are what the allocators account
for, so a Hypothesis state machine drives it through inserts, matches, locks, host protection,
write-through, load-back, prefetch-style host inserts and evictions, and checks it against a
page-level model after every step: which page prefix holds which device / host slots, lock and
host-ref counts, and that every slot the allocators hand out is held by the tree exactly once.
A second tree fed the same operations must end with the same digest (determinism).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from reference.hashing import page_hashes
from reference.memory_pool import PageAllocator
from reference.radix_tree import RadixTree, TreeNode

PS = 2
# at least the brief's 100; a larger profile (e.g. nightly) raises it
EXAMPLES = max(100, settings.default.max_examples)
DEVICE_PAGES = 24
HOST_PAGES = 24
# Three page values and short sequences: prefixes are shared often, so splits happen.
PAGE_VALUES = [(0, 0), (0, 1), (1, 0)]

Prefix = tuple[int, ...]
Slots = tuple[int, ...]

token_lists = st.lists(st.sampled_from(PAGE_VALUES), min_size=1, max_size=6).map(
    lambda pages: [t for p in pages for t in p]
)


# -- tree helpers ------------------------------------------------------------------------------


def path_tokens(node: TreeNode) -> Prefix:
    parts: list[Prefix] = []
    while node.parent is not None:
        parts.append(node.key)
        node = node.parent
    return tuple(t for k in reversed(parts) for t in k)


def attached(tree: RadixTree, node: TreeNode) -> bool:
    """Whether `node` is still reachable from the root (not cut out of the tree)."""
    while node is not tree.root:
        parent = node.parent
        if parent is None or parent.children.get(node.key[:PS]) is not node:
            return False
        node = parent
    return True


def as_slots(t: torch.Tensor) -> Slots:
    return tuple(int(x) for x in t.tolist())


def pages_of(t: torch.Tensor) -> list[Slots]:
    s = as_slots(t)
    return [s[i : i + PS] for i in range(0, len(s), PS)]


def evict_candidates_device(tree: RadixTree) -> list[TreeNode]:
    return [
        n for n in tree.nodes()
        if not n.evicted and n.lock_ref == 0 and all(c.evicted for c in n.children.values())
        and (n.backuped or n.host_ref_counter == 0)
    ]


def evict_candidates_host(tree: RadixTree) -> list[TreeNode]:
    return [
        n for n in tree.nodes()
        if n.evicted and n.backuped and not n.children
        and n.host_ref_counter == 0 and n.lock_ref == 0
    ]


# -- one world: a tree and its two real allocators ---------------------------------------------


@dataclass
class World:
    tree: RadixTree = field(default_factory=lambda: RadixTree(PS))
    dev: PageAllocator = field(default_factory=lambda: PageAllocator(DEVICE_PAGES, PS, "device"))
    host: PageAllocator = field(
        default_factory=lambda: PageAllocator(HOST_PAGES, PS, "host")
    )
    locks: list[TreeNode] = field(default_factory=list)
    host_refs: list[TreeNode] = field(default_factory=list)


def freeing(alloc: PageAllocator, freed: list[Slots]):
    """A free callback that records what it frees; the real allocator rejects double frees."""

    def free(t: torch.Tensor) -> None:
        alloc.free(t)
        freed.extend(pages_of(t))

    return free


class RadixTreeMachine(RuleBasedStateMachine):
    """World `a` is checked against the model; world `b` replays every operation of `a`."""

    @initialize()
    def setup(self) -> None:
        self.a = World()
        self.b = World()
        self.dev: dict[Prefix, Slots] = {}
        self.host: dict[Prefix, Slots] = {}
        self.lock_paths: list[Prefix] = []
        self.host_ref_paths: list[Prefix] = []

    def both(self) -> tuple[World, World]:
        return self.a, self.b

    # -- model helpers --------------------------------------------------------------------------
    def expected_match(self, tokens: Sequence[int]) -> tuple[list[Slots], int]:
        """Device slots of the longest device-resident prefix, then the host-resident run."""
        dev: list[Slots] = []
        i = PS
        while i <= len(tokens) and tuple(tokens[:i]) in self.dev:
            dev.append(self.dev[tuple(tokens[:i])])
            i += PS
        host_len = 0
        while i <= len(tokens) and tuple(tokens[:i]) in self.host:
            host_len += PS
            i += PS
        return dev, host_len

    def check_match(self, w: World, tokens: list[int]):
        want_dev, want_host = self.expected_match(tokens)
        m = w.tree.match_prefix(tokens)
        assert pages_of(m.device_indices) == want_dev
        assert m.host_hit_length == want_host
        dev_len = len(want_dev) * PS
        assert path_tokens(m.last_device_node) == tuple(tokens[:dev_len])
        # SGLang's last_host_node: the deepest matched node on host (the root if none)
        on_host = [n for n in range(PS, dev_len + want_host + 1, PS)
                   if tuple(tokens[:n]) in self.host]
        assert path_tokens(m.last_host_node) == tuple(tokens[: max(on_host, default=0)])
        return m

    # -- rules ----------------------------------------------------------------------------------
    @rule(tokens=token_lists)
    def match_prefix(self, tokens: list[int]) -> None:
        ma = self.check_match(self.a, tokens)
        mb = self.b.tree.match_prefix(tokens)
        assert torch.equal(ma.device_indices, mb.device_indices)
        assert ma.host_hit_length == mb.host_hit_length

    @rule(tokens=token_lists, reuse_prefix=st.booleans())
    def insert_device(self, tokens: list[int], reuse_prefix: bool) -> None:
        """A finished request: its matched prefix slots plus fresh ones (or all fresh)."""
        results = []
        for w in self.both():
            prefix = w.tree.match_prefix(tokens).device_indices if reuse_prefix else None
            if prefix is None:
                prefix = torch.empty(0, dtype=torch.int64)
            new = w.dev.alloc(len(tokens) - prefix.numel())
            if new is None:
                results.append(None)
                continue
            values = torch.cat([prefix, new])
            node, dups = w.tree.insert(tokens, device_indices=values)
            assert path_tokens(node) == tuple(tokens)
            dup_pages = [p for d in dups for p in pages_of(d)]
            for d in dups:
                w.dev.free(d)  # raises on a slot the tree still holds or already freed
            results.append((as_slots(values), dup_pages))
        assert results[0] == results[1]
        if results[0] is None:
            return
        values, dup_pages = results[0]
        want_dups: list[Slots] = []
        for i in range(0, len(tokens), PS):
            key, given = tuple(tokens[: i + PS]), values[i : i + PS]
            if key not in self.dev:
                self.dev[key] = given
            elif self.dev[key] != given:
                want_dups.append(given)
        assert sorted(dup_pages) == sorted(want_dups)

    @rule(tokens=token_lists, pages=st.integers(1, 6))
    def insert_host(self, tokens: list[int], pages: int) -> None:
        """Prefetched pages landing below the match's last host node (a storage hit): the
        pages after the whole match, hung from that node as SGLang's prefetch inserts them
        (off their prefix when the match ends on device-only nodes)."""
        results = []
        for w in self.both():
            m = w.tree.match_prefix(tokens)
            start = m.device_indices.numel() + m.host_hit_length
            rest = tokens[start : start + pages * PS]
            h = w.host.alloc(len(rest)) if rest else None
            if h is None:
                results.append(None)
                continue
            base = path_tokens(m.last_host_node)
            node, dups = w.tree.insert(rest, host_indices=h, from_node=m.last_host_node)
            assert path_tokens(node) == base + tuple(rest)
            dup_pages = [p for d in dups for p in pages_of(d)]
            for d in dups:
                w.host.free(d)
            results.append((base + tuple(rest), as_slots(h), dup_pages))
        assert results[0] == results[1]
        if results[0] is None:
            return
        full, h, dup_pages = results[0]
        start = len(full) - len(h)
        want_dups: list[Slots] = []
        for i in range(0, len(h), PS):
            key, given = full[: start + i + PS], h[i : i + PS]
            if key not in self.host:
                self.host[key] = given
            elif self.host[key] != given:
                want_dups.append(given)
        assert sorted(dup_pages) == sorted(want_dups)

    @rule(tokens=token_lists)
    def write_through(self, tokens: list[int]) -> None:
        """Back up every device node on the matched path, root first (HiRadixCache.write_backup)."""
        results = []
        for w in self.both():
            m = w.tree.match_prefix(tokens)
            path: list[TreeNode] = []
            node = m.last_device_node
            while node is not w.tree.root:
                path.append(node)
                node = node.parent  # type: ignore[assignment]
            done = []
            for n in reversed(path):
                if n.backuped:
                    continue
                assert n.value is not None
                h = w.host.alloc(n.value.numel())
                if h is None:
                    break
                n.host_value = h
                done.append((path_tokens(n), len(n.key), as_slots(h)))
            results.append(done)
        assert results[0] == results[1]
        for end, length, slots in results[0]:
            for i in range(0, length, PS):
                key = end[: len(end) - length + i + PS]
                assert key not in self.host
                self.host[key] = slots[i : i + PS]

    @rule(tokens=token_lists)
    def load_back(self, tokens: list[int]) -> None:
        """Host hits back to the device (HiRadixCache.init_load_back, copy elided)."""
        results = []
        for w in self.both():
            m = w.tree.match_prefix(tokens)
            if not m.host_hit_length:
                results.append(None)
                continue
            nodes: list[TreeNode] = []
            node = m.last_host_node
            while node.evicted:
                nodes.append(node)
                node = node.parent  # type: ignore[assignment]
            assert sum(len(n.key) for n in nodes) == m.host_hit_length
            d = w.dev.alloc(m.host_hit_length)
            if d is None:
                results.append(None)
                continue
            pos = 0
            for n in reversed(nodes):
                n.value = d[pos : pos + len(n.key)]
                pos += len(n.key)
            results.append((m.device_indices.numel(), as_slots(d)))
        assert results[0] == results[1]
        if results[0] is None:
            return
        start, d = results[0]
        for i in range(0, len(d), PS):
            key = tuple(tokens[: start + i + PS])
            assert key not in self.dev and key in self.host
            self.dev[key] = d[i : i + PS]

    @rule(tokens=token_lists)
    def lock(self, tokens: list[int]) -> None:
        for w in self.both():
            node = w.tree.match_prefix(tokens).last_device_node
            w.tree.inc_lock_ref(node)
            w.locks.append(node)
        self.lock_paths.append(path_tokens(self.a.locks[-1]))

    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        if not self.a.locks:
            return
        i = data.draw(st.integers(0, len(self.a.locks) - 1))
        for w in self.both():
            w.tree.dec_lock_ref(w.locks.pop(i))
        self.lock_paths.pop(i)

    @rule(tokens=token_lists)
    def protect_host(self, tokens: list[int]) -> None:
        """What a prefetch does to the node it will insert below (inc_host_ref)."""
        for w in self.both():
            node = w.tree.match_prefix(tokens).last_host_node
            w.tree.inc_host_ref(node)
            w.host_refs.append(node)
        self.host_ref_paths.append(path_tokens(self.a.host_refs[-1]))

    @rule(data=st.data())
    def release_host(self, data: st.DataObject) -> None:
        if not self.a.host_refs:
            return
        i = data.draw(st.integers(0, len(self.a.host_refs) - 1))
        for w in self.both():
            w.tree.dec_host_ref(w.host_refs.pop(i))
        self.host_ref_paths.pop(i)

    @rule(num_tokens=st.integers(0, 8).map(lambda n: n * PS))
    def evict_device(self, num_tokens: int) -> None:
        results = []
        for w in self.both():
            freed: list[Slots] = []
            n = w.tree.evict_device(num_tokens, freeing(w.dev, freed))
            assert n == len(freed) * PS
            if n < num_tokens:
                assert not evict_candidates_device(w.tree)
            results.append(freed)
        assert results[0] == results[1]
        freed_set = set(results[0])
        assert len(freed_set) == len(results[0])
        gone = {k for k, v in self.dev.items() if v in freed_set}
        assert {self.dev[k] for k in gone} == freed_set  # freed exactly what it dropped
        for k in gone:
            assert not any(p[: len(k)] == k for p in self.lock_paths), "evicted a locked page"
            del self.dev[k]

    @rule(num_tokens=st.integers(0, 8).map(lambda n: n * PS))
    def evict_host(self, num_tokens: int) -> None:
        results = []
        for w in self.both():
            freed: list[Slots] = []
            n = w.tree.evict_host(num_tokens, freeing(w.host, freed))
            assert n == len(freed) * PS
            if n < num_tokens:
                assert not evict_candidates_host(w.tree)
            results.append(freed)
        assert results[0] == results[1]
        freed_set = set(results[0])
        gone = {k for k, v in self.host.items() if v in freed_set}
        assert {self.host[k] for k in gone} == freed_set
        for k in gone:
            assert k not in self.dev, "host copy dropped while the page is on the device"
            assert not any(p[: len(k)] == k for p in self.lock_paths + self.host_ref_paths)
            del self.host[k]

    # -- invariants (one walk per step keeps the file fast) --------------------------------------
    @invariant()
    def tree_agrees_with_model(self) -> None:
        tree = self.a.tree
        assert tree.root.lock_ref >= 1
        dev: dict[Prefix, Slots] = {}
        host: dict[Prefix, Slots] = {}
        stack: list[tuple[TreeNode, Prefix]] = [(tree.root, ())]
        while stack:
            node, path = stack.pop()
            for first, child in node.children.items():
                # structure: page-aligned non-empty keys, children keyed by their first page
                assert child.parent is node
                assert child.key and len(child.key) % PS == 0
                assert first == child.key[:PS]
                assert child.lock_ref >= 0 and child.host_ref_counter >= 0
                full = path + child.key
                assert child.hash_value == page_hashes(full, PS)[len(path) // PS :]
                # device residency is closed under ancestors (match stops at the first miss)
                assert child.evicted or not node.evicted
                for v, into in ((child.value, dev), (child.host_value, host)):
                    if v is not None:
                        assert v.numel() == len(child.key)
                        for i, slots in enumerate(pages_of(v)):
                            into[full[: len(path) + (i + 1) * PS]] = slots
                # every lock / host ref on this node or below counts once, on every page
                assert child.lock_ref == sum(p[: len(full)] == full for p in self.lock_paths)
                assert child.host_ref_counter == sum(
                    p[: len(full)] == full for p in self.host_ref_paths
                )
                stack.append((child, full))
        assert dev == self.dev
        assert host == self.host

    @invariant()
    def accounting_and_determinism(self) -> None:
        for w in self.both():
            held = w.tree.cached_tokens()
            assert held["device"] == w.dev.used_size()
            assert held["host"] == w.host.used_size()
            # a locked or host-protected node is where a later unlock / insert starts from
            for node in w.locks + w.host_refs:
                assert attached(w.tree, node)
        assert self.a.tree.digest() == self.b.tree.digest()


RadixTreeMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixTree = RadixTreeMachine.TestCase


# -- direct examples -------------------------------------------------------------------------


def test_partial_match_splits_node() -> None:
    """Matching inside a node cuts it at the page boundary; slots and hashes follow the cut."""
    tree = RadixTree(PS)
    slots = torch.arange(8, dtype=torch.int64)
    tree.insert([1, 1, 2, 2, 3, 3, 4, 4], device_indices=slots)
    assert len(tree.root.children) == 1
    m = tree.match_prefix([1, 1, 2, 2, 9, 9])
    assert torch.equal(m.device_indices, slots[:4])
    upper = m.last_device_node
    assert upper.key == (1, 1, 2, 2) and list(upper.children) == [(3, 3)]
    lower = upper.children[(3, 3)]
    assert torch.equal(lower.value, slots[4:])
    assert upper.hash_value + lower.hash_value == page_hashes([1, 1, 2, 2, 3, 3, 4, 4], PS)


def test_evict_device_keeps_host_protected_node() -> None:
    """A node a prefetch hangs from (host_ref > 0) must not be cut out by device eviction.

    HiRadixCache.prefetch_from_storage protects `last_host_node` with inc_host_ref and later
    inserts the fetched pages below it; if eviction deleted it meanwhile, those pages (and
    their host slots) would land in a detached subtree that nothing can free.
    """
    tree = RadixTree(PS)
    dev = PageAllocator(8, PS, "device")
    tree.insert([1, 1, 2, 2], device_indices=dev.alloc(4))
    m = tree.match_prefix([1, 1, 2, 2, 3, 3])
    assert m.last_host_node is tree.root  # SGLang's: nothing on host is matched
    node = m.last_device_node  # the tree's guard holds for any protected node
    assert path_tokens(node) == (1, 1, 2, 2) and not node.backuped
    tree.inc_host_ref(node)
    tree.evict_device(4, dev.free)
    assert attached(tree, node)
    host = PageAllocator(8, PS, "host")
    h = host.alloc(2)
    tree.insert([3, 3], host_indices=h, from_node=node)
    assert tree.cached_tokens()["host"] == host.used_size() == 2
    tree.dec_host_ref(node)
