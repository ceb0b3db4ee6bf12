"""Device and host KV pools with page allocators that account for every slot.

Layouts follow SGLang: the device pool is layer-first (layers x parts x slots x heads x dim,
parts = k,v for MHA or one latent part for MLA); the host pool is page-first
(pages x parts x layers x page_size x heads x dim) so each (page, part) is one contiguous
block that a storage backend can move without a gather.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


class AllocatorError(RuntimeError):
    """A double free, a free of a never-allocated slot, or a malformed index set."""


class PageAllocator:
    """Hands out token slots a whole page at a time; frees are checked, never silent."""

    def __init__(self, num_pages: int, page_size: int, name: str) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.name = name
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() gives low pages first
        self._in_use = [False] * num_pages
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.num_pages * self.page_size

    def available_size(self) -> int:
        return len(self._free) * self.page_size

    def used_size(self) -> int:
        return self.size - self.available_size()

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Token indices for `num_tokens` (a page multiple), or None when the pool is short."""
        if num_tokens % self.page_size:
            raise AllocatorError(f"{self.name}: alloc of {num_tokens} tokens is not page-aligned")
        n = num_tokens // self.page_size
        with self._lock:
            if n > len(self._free):
                return None
            pages = [self._free.pop() for _ in range(n)]
            for p in pages:
                self._in_use[p] = True
        return self._pages_to_tokens(pages)

    def free(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        if indices.numel() % self.page_size:
            raise AllocatorError(f"{self.name}: free of {indices.numel()} slots is not page-aligned")
        rows = indices.view(-1, self.page_size)
        in_page = torch.arange(self.page_size, dtype=rows.dtype, device=rows.device)
        if bool((rows[:, 0] % self.page_size).any()) or not torch.equal(
            rows, rows[:, :1] + in_page
        ):
            raise AllocatorError(f"{self.name}: free of slots that are not whole pages")
        pages = rows[:, 0].div(self.page_size, rounding_mode="floor")
        with self._lock:
            page_list = pages.tolist()
            if len(set(page_list)) != len(page_list):
                raise AllocatorError(f"{self.name}: free names a page twice: {page_list}")
            for p in page_list:
                if not 0 <= p < self.num_pages or not self._in_use[p]:
                    raise AllocatorError(f"{self.name}: double free or foreign page {p}")
            for p in page_list:
                self._in_use[p] = False
                self._free.append(p)

    def _pages_to_tokens(self, pages: list[int]) -> torch.Tensor:
        """One tensor op (as SGLang's slice of its free slots): this runs on every prefetch
        and write, and each small op costs tens of microseconds when the caches are cold."""
        ps = self.page_size
        if pages and pages[-1] - pages[0] == len(pages) - 1 and pages == list(
                range(pages[0], pages[-1] + 1)):
            return torch.arange(pages[0] * ps, (pages[-1] + 1) * ps, dtype=torch.int64)
        return torch.tensor([p * ps + i for p in pages for i in range(ps)], dtype=torch.int64)


@dataclass(frozen=True)
class KVShape:
    """Per-rank KV geometry: MHA shards heads over TP, MLA keeps one latent part."""

    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    is_mla: bool = False
    dtype: torch.dtype = torch.float16

    @property
    def parts(self) -> tuple[str, ...]:
        return ("k",) if self.is_mla else ("k", "v")


class DeviceKVPool:
    """L1: the KV the forward pass reads; on CUDA when present."""

    def __init__(self, shape: KVShape, num_pages: int, page_size: int, device: torch.device):
        self.shape = shape
        self.page_size = page_size
        self.device = device
        self.allocator = PageAllocator(num_pages, page_size, "device")
        self.buffer = torch.zeros(
            shape.layers, len(shape.parts), num_pages * page_size, shape.heads, shape.head_dim,
            dtype=shape.dtype, device=device,
        )
        #: the same memory seen page-first, in words: what the host copies gather and scatter
        self.page_major = _page_major(self.buffer, page_size)


class HostKVPool:
    """L2: pinned when CUDA is present, page-first so a page part is one contiguous block."""

    def __init__(self, shape: KVShape, num_pages: int, page_size: int, pin: bool):
        self.shape = shape
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages, page_size, "host")
        self.buffer = torch.zeros(
            num_pages, len(shape.parts), shape.layers, page_size, shape.heads, shape.head_dim,
            dtype=shape.dtype, pin_memory=pin,
        )
        #: the same memory in words: what the device copies move
        self.words = _as_words(self.buffer)
        self._part_bytes = self.buffer[0, 0].numel() * self.buffer.element_size()
        self._mapped: dict[torch.device, torch.Tensor | None] = {}

    def mapped_words(self, device: torch.device) -> torch.Tensor | None:
        """`words` as a tensor on `device` over the same pinned bytes (CUDA unified addressing),
        so that one kernel writes pages straight into host memory, as SGLang's transfer kernels
        do; None where the pool is not pinned or the view cannot be made (the copies then stage
        on the device and DMA). Made once per device; the pool owns the memory it points at."""
        if device not in self._mapped:
            self._mapped[device] = _mapped_view(self.words, device) if (
                device.type == "cuda" and self.buffer.is_pinned()) else None
        return self._mapped[device]

    def get_page_buffer_meta(self, host_indices: torch.Tensor) -> tuple[list[int], list[int]]:
        """SGLang's name: (addresses, byte sizes) of every part of every page of
        `host_indices`, page by page in KVShape.parts order, as zero-copy backends take them.
        Arithmetic on the page-first layout, no tensor views: 9 us per 32 pages, where
        views and their pointers cost 23 us warm and 60-90 us on a busy box."""
        ps = self.page_size
        n_parts = len(self.shape.parts)
        nbytes = self._part_bytes
        base = self.buffer.data_ptr()
        starts = host_indices.tolist()[::ps]  # one tensor op
        ptrs = [base + (start // ps * n_parts + p) * nbytes
                for start in starts for p in range(n_parts)]
        return ptrs, [nbytes] * len(ptrs)

    def page_part(self, token_index: int, part: int) -> torch.Tensor:
        """The contiguous block holding one part of the page that starts at `token_index`."""
        return self.buffer[token_index // self.page_size, part]

    def page_parts(self, host_indices: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per page of `host_indices`: its parts, in KVShape.parts order."""
        starts = host_indices.view(-1, self.page_size)[:, 0].tolist()
        return [[self.page_part(s, p) for p in range(len(self.shape.parts))] for s in starts]


def _page_runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """(first page, page count, offset) per run of consecutive pages: one copy each."""
    runs, start = [], 0
    for i in range(1, len(pages) + 1):
        if i == len(pages) or pages[i] != pages[i - 1] + 1:
            runs.append((pages[start], i - start, start))
            start = i
    return runs


def _pages(idx: torch.Tensor, page_size: int) -> list[int]:
    """Page numbers of whole-page token indices, in order (a short list: cheaper than tensor
    ops at this size, which matters for small copies).

    Not checked here (it would cost more than a small copy): every index set comes from
    PageAllocator, which hands out and takes back whole pages only, as SGLang's paged transfer
    kernels also assume.
    """
    return [t // page_size for t in idx[::page_size].tolist()]


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes seen as the widest integers that tile a row: copy kernels move elements,
    so 8-byte words move a page in a quarter of the steps fp16 takes (measured on H200: the
    device pass of a 64 KiB page part went from 31 to 26 us, at 1 MiB from 197 to 91 us)."""
    row = t.shape[-1] * t.element_size()
    for word in (torch.int64, torch.int32, torch.int16):
        if row % word.itemsize == 0:
            return t.view(word)
    return t


class _CudaArray:
    """The CUDA array interface of a pinned host tensor: how torch is told to see it on a GPU."""

    def __init__(self, t: torch.Tensor) -> None:
        typestr = {torch.int64: "<i8", torch.int32: "<i4", torch.int16: "<i2"}.get(t.dtype)
        if typestr is None or not t.is_contiguous():
            raise ValueError("only contiguous word views are mapped")
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": typestr,
                                         "data": (t.data_ptr(), False), "version": 3,
                                         "strides": None}


def _mapped_view(words: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Pinned host `words` seen from `device` (its pointer, unchanged), or None if refused."""
    try:
        view = torch.as_tensor(_CudaArray(words), device=device)
    except (ValueError, TypeError, RuntimeError):
        return None
    ok = view.is_cuda and view.data_ptr() == words.data_ptr() and view.shape == words.shape
    return view if ok else None


def _page_major(buffer: torch.Tensor, page_size: int) -> torch.Tensor:
    """A layer-first device pool seen page-first (pages x parts x layers x page_size x H x D).

    A view, not a copy: gathering or scattering whole pages through it is one device pass that
    does the layout transpose on the way, as SGLang's fused transfer kernels do.
    """
    b = _as_words(buffer)
    return b.view(b.shape[0], b.shape[1], -1, page_size, *b.shape[3:]).permute(2, 1, 0, 3, 4, 5)


def _device_pages(device: DeviceKVPool, d_idx: torch.Tensor) -> slice | torch.Tensor:
    """The device pages to gather or scatter: a slice when they are consecutive (no index
    tensor crosses to the GPU), else their numbers on the device."""
    p = _pages(d_idx, device.page_size)
    if p == list(range(p[0], p[0] + len(p))):
        return slice(p[0], p[0] + len(p))
    return torch.tensor(p, dtype=torch.int64).to(device.device, non_blocking=True)


def device_to_host(device: DeviceKVPool, host: HostKVPool, d_idx: torch.Tensor, h_idx: torch.Tensor):
    """Copy the whole pages at token slots d_idx of the device pool into host slots h_idx.

    With a pinned pool on a GPU, one kernel gathers the pages and writes them, page-first,
    straight into host memory (measured on H200, 64 pages x 64 KiB parts: 80-82% of one pinned
    `copy_`, staging on the device and then a DMA 76-81% in the same runs). Elsewhere one pass on
    the device puts the pages in the page-first layout, then each run of consecutive host pages
    is one DMA into the pool.
    """
    which = _device_pages(device, d_idx)
    pm = device.page_major
    runs = _page_runs(_pages(h_idx, host.page_size))
    mapped = host.mapped_words(device.device)
    if mapped is not None:
        for first, count, off in runs:
            dst = mapped[first:first + count]
            if isinstance(which, slice):
                dst.copy_(pm[which.start + off:which.start + off + count])
            else:
                torch.index_select(pm, 0, which[off:off + count], out=dst)
        # the bytes must have arrived before the ack: wait for this stream's kernels
        torch.cuda.current_stream(device.device).synchronize()
        return
    src = pm[which] if isinstance(which, slice) else pm.index_select(0, which)
    # blocking: the bytes must have arrived before the ack (on GPU this waits only for the
    # caller's copy stream, which is what the write ack measures anyway)
    if len(runs) == 1:
        host.words[runs[0][0]:runs[0][0] + runs[0][1]].copy_(src)
        return
    for first, count, off in runs:
        host.words[first:first + count].copy_(src[off:off + count])


def host_to_device(host: HostKVPool, device: DeviceKVPool, h_idx: torch.Tensor, d_idx: torch.Tensor):
    """Copy host slots h_idx into the whole device pages at token slots d_idx: each run of
    consecutive host pages is one DMA into a staging buffer, then one pass on the device
    writes them layer-first."""
    runs = _page_runs(_pages(h_idx, host.page_size))
    if len(runs) == 1:
        first, count, _ = runs[0]
        staged = host.words[first:first + count].to(device.device, non_blocking=True)
    else:
        staged = torch.empty((sum(r[1] for r in runs), *host.words.shape[1:]),
                             dtype=host.words.dtype, device=device.device)
        for first, count, off in runs:
            staged[off:off + count].copy_(host.words[first:first + count], non_blocking=True)
    which = _device_pages(device, d_idx)
    if isinstance(which, slice):
        device.page_major[which].copy_(staged)
    else:
        device.page_major.index_copy_(0, which, staged)
