"""`reference.memory_pool`: allocators that never leak or double-free, and exact KV copies.

The harness proves "no slot leaked" by comparing allocator usage with what the tree holds, so
the allocator itself must be exact: every free is checked, never silent. The device <-> host
copies must move bytes exactly whatever pages the allocators hand out, for MHA and MLA shapes.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.memory_pool import (
    AllocatorError,
    DeviceKVPool,
    HostKVPool,
    KVShape,
    PageAllocator,
    device_to_host,
    host_to_device,
)

PS = 4
# at least 100 / 150; a larger Hypothesis profile (e.g. nightly) raises it
EXAMPLES = max(100, settings.default.max_examples)
MORE_EXAMPLES = max(150, settings.default.max_examples)
PAGES = 16


def pages_of(t: torch.Tensor, ps: int = PS) -> list[int]:
    """Page numbers of a page-aligned token index tensor, checking each row is a whole page."""
    rows = t.view(-1, ps)
    starts = rows[:, 0]
    assert torch.equal(starts % ps, torch.zeros_like(starts))
    assert torch.equal(rows, starts[:, None] + torch.arange(ps)[None, :])
    return (starts // ps).tolist()


# -- allocator ---------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, PAGES + 2)),
        st.tuples(st.just("free"), st.integers(0, 10**6)),
        st.tuples(st.just("free_part"), st.integers(0, 10**6)),
        st.tuples(st.just("double_free"), st.integers(0, 10**6)),
    ),
    max_size=60,
)


@settings(max_examples=MORE_EXAMPLES, deadline=None)
@given(ops=ops)
def test_allocator_never_leaks_or_double_frees(ops: list[tuple[str, int]]) -> None:
    """Random alloc / free (whole or partial) against a model of held pages."""
    alloc = PageAllocator(PAGES, PS, "t")
    held: list[list[int]] = []  # live allocations, as page lists
    freed: list[int] = []  # pages freed at least once and not re-allocated since
    for op, n in ops:
        if op == "alloc":
            got = alloc.alloc(n * PS)
            in_use = sum(len(h) for h in held)
            if n > PAGES - in_use:
                assert got is None
            else:
                assert got is not None and got.dtype == torch.int64 and got.numel() == n * PS
                pages = pages_of(got)
                assert len(set(pages)) == n
                assert not set(pages) & {p for h in held for p in h}, "handed out a held page"
                assert all(0 <= p < PAGES for p in pages)
                if pages:
                    held.append(pages)
                freed = [p for p in freed if p not in pages]
        elif op in ("free", "free_part") and held:
            pages = held.pop(n % len(held))
            if op == "free_part" and len(pages) > 1:  # give back a slice, keep the rest
                cut = 1 + n % (len(pages) - 1)
                held.append(pages[cut:])
                pages = pages[:cut]
            alloc.free(_tokens(pages))
            freed.extend(pages)
        elif op == "double_free" and freed:
            before = alloc.available_size()
            with pytest.raises(AllocatorError):
                alloc.free(_tokens([freed[n % len(freed)]]))
            assert alloc.available_size() == before
        in_use = sum(len(h) for h in held)
        assert alloc.used_size() == in_use * PS
        assert alloc.available_size() == (PAGES - in_use) * PS
    for pages in held:
        alloc.free(_tokens(pages))
    assert alloc.used_size() == 0
    everything = alloc.alloc(PAGES * PS)
    assert everything is not None and sorted(pages_of(everything)) == list(range(PAGES))


def _tokens(pages: list[int], ps: int = PS) -> torch.Tensor:
    base = torch.tensor(pages, dtype=torch.int64) * ps
    return (base[:, None] + torch.arange(ps)[None, :]).reshape(-1)


def test_double_free_raises_and_changes_nothing() -> None:
    alloc = PageAllocator(4, PS, "t")
    a = alloc.alloc(2 * PS)
    b = alloc.alloc(PS)
    assert a is not None and b is not None
    alloc.free(a)
    with pytest.raises(AllocatorError, match="double free"):
        alloc.free(a)
    # a batch naming one live and one freed page is rejected whole: the live page stays held
    with pytest.raises(AllocatorError):
        alloc.free(torch.cat([b, a[:PS]]))
    assert alloc.used_size() == PS
    alloc.free(b)
    assert alloc.used_size() == 0


@pytest.mark.parametrize("bad", [[4 * PS + i for i in range(PS)], [-PS + i for i in range(PS)]])
def test_foreign_page_raises(bad: list[int]) -> None:
    alloc = PageAllocator(4, PS, "t")
    assert alloc.alloc(4 * PS) is not None
    with pytest.raises(AllocatorError, match="foreign page"):
        alloc.free(torch.tensor(bad, dtype=torch.int64))
    assert alloc.used_size() == 4 * PS


def test_page_named_twice_raises() -> None:
    alloc = PageAllocator(4, PS, "t")
    a = alloc.alloc(PS)
    assert a is not None
    with pytest.raises(AllocatorError, match="twice"):
        alloc.free(torch.cat([a, a]))
    assert alloc.used_size() == PS


@pytest.mark.parametrize("n", [1, PS - 1, PS + 1, 3 * PS + 2])
def test_unaligned_alloc_and_free_raise(n: int) -> None:
    alloc = PageAllocator(8, PS, "t")
    with pytest.raises(AllocatorError, match="page-aligned"):
        alloc.alloc(n)
    a = alloc.alloc(2 * PS)
    assert a is not None
    with pytest.raises(AllocatorError, match="page-aligned"):
        alloc.free(a[: n % (2 * PS) or 1])
    assert alloc.used_size() == 2 * PS


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda a: a[1 : PS + 1],  # straddles two pages
        lambda a: a[:PS].flip(0),  # the right page, slots out of order
        lambda a: torch.cat([a[: PS - 1], a[PS : PS + 1]]),  # last slot from another page
    ],
)
def test_malformed_page_raises(make_bad) -> None:  # noqa: ANN001
    """A slot set that is not whole pages is a caller bug; freeing the page it starts in
    would hide it (and free slots the caller still uses)."""
    alloc = PageAllocator(4, PS, "t")
    a = alloc.alloc(2 * PS)
    assert a is not None
    with pytest.raises(AllocatorError):
        alloc.free(make_bad(a))
    assert alloc.used_size() == 2 * PS


def test_concurrent_alloc_free_is_exact() -> None:
    """IO threads and the scheduler share allocators: no page is ever handed out twice."""
    alloc = PageAllocator(64, PS, "t")
    seen_twice: list[int] = []
    live: set[int] = set()
    live_lock = threading.Lock()

    def worker() -> None:
        for i in range(300):
            got = alloc.alloc((1 + i % 3) * PS)
            if got is None:
                continue
            pages = pages_of(got)
            with live_lock:
                seen_twice.extend(p for p in pages if p in live)
                live.update(pages)
            with live_lock:
                live.difference_update(pages)
            alloc.free(got)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert seen_twice == []
    assert alloc.used_size() == 0


# -- device <-> host copies --------------------------------------------------------------------

SHAPES = [
    KVShape(layers=2, heads=2, head_dim=8, is_mla=False, dtype=torch.float16),
    KVShape(layers=3, heads=1, head_dim=8, is_mla=True, dtype=torch.bfloat16),
    KVShape(layers=1, heads=3, head_dim=4, is_mla=False, dtype=torch.float32),
]


def _random_bits(pool: DeviceKVPool, seed: int) -> None:
    """Fill the device pool with random bit patterns (NaNs included): bytes must survive."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (pool.buffer.numel() * pool.buffer.element_size(),),
                        dtype=torch.uint8, generator=g)
    pool.buffer.view(-1).view(torch.uint8).copy_(raw.to(pool.buffer.device))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_device_host_round_trip(shape: KVShape, data: st.DataObject, seed: int) -> None:
    _round_trip(shape, data, seed, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(max_examples=EXAMPLES, deadline=None)
@given(shape=st.sampled_from(SHAPES), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_device_host_round_trip_on_cuda_writes_pinned_memory_directly(
        shape: KVShape, data: st.DataObject, seed: int) -> None:
    """The same exactness where write-through is one kernel writing into pinned host memory."""
    _round_trip(shape, data, seed, torch.device("cuda", 0))


def test_unpinned_or_cpu_pools_are_never_mapped() -> None:
    host = HostKVPool(SHAPES[0], 2, PS, pin=False)
    assert host.mapped_words(torch.device("cpu")) is None
    assert host.mapped_words(torch.device("cuda", 0)) is None  # not pinned: staged copies


def _round_trip(shape: KVShape, data: st.DataObject, seed: int, where: torch.device) -> None:
    dev_pages, host_pages = 8, 6
    cuda = where.type == "cuda"
    device = DeviceKVPool(shape, dev_pages, PS, where)
    host = HostKVPool(shape, host_pages, PS, pin=cuda)
    assert (host.mapped_words(where) is not None) == cuda, "the direct path is not taken"
    _random_bits(device, seed)
    original = device.buffer.cpu().clone()
    n = data.draw(st.integers(1, host_pages), label="pages")
    src = data.draw(st.permutations(range(dev_pages)), label="src")[:n]
    dst = data.draw(st.permutations(range(host_pages)), label="dst")[:n]
    back = data.draw(st.permutations(range(dev_pages)), label="back")[:n]
    d_idx, h_idx, b_idx = _tokens(src), _tokens(dst), _tokens(back)

    device_to_host(device, host, d_idx, h_idx)
    assert torch.equal(_bytes(device.buffer.cpu()), _bytes(original)), "device changed by a write"
    for s, d in zip(src, dst, strict=True):
        for part in range(len(shape.parts)):
            want = original[:, part, s * PS : (s + 1) * PS]  # layers x ps x H x D
            # the host page part is one contiguous block: layers x ps x H x D
            got = host.page_part(d * PS, part)
            assert got.is_contiguous()
            assert torch.equal(_bytes(got), _bytes(want))
    untouched = sorted(set(range(host_pages)) - set(dst))
    assert torch.equal(_bytes(host.buffer[untouched]),
                       torch.zeros_like(_bytes(host.buffer[untouched])))

    device.buffer.zero_()
    host_to_device(host, device, h_idx, b_idx)
    for s, b in zip(src, back, strict=True):
        assert torch.equal(_bytes(device.buffer[:, :, b * PS : (b + 1) * PS].cpu()),
                           _bytes(original[:, :, s * PS : (s + 1) * PS]))
    rest = [t for p in sorted(set(range(dev_pages)) - set(back)) for t in range(p * PS, (p + 1) * PS)]
    assert not _bytes(device.buffer[:, :, rest].cpu()).any(), "load wrote outside its slots"


def test_page_parts_order_matches_shape() -> None:
    shape = KVShape(layers=1, heads=1, head_dim=2)
    host = HostKVPool(shape, 3, PS, pin=False)
    host.buffer[2, 1].fill_(7)
    parts = host.page_parts(_tokens([2, 0]))
    assert len(parts) == 2 and all(len(p) == len(shape.parts) == 2 for p in parts)
    assert bool((parts[0][1] == 7).all()) and not parts[0][0].any() and not parts[1][1].any()

