"""The reference's host <-> device KV copies against plain pinned-copy bandwidth, same run.

`device_to_host` (write-through, L1 -> L2; on a GPU one kernel writing into pinned memory,
"staged" is its fallback: a device pass, then a DMA) and `host_to_device` (load-back, L2 -> L1) move
`--pages` pages between a DeviceKVPool and a pinned HostKVPool; the baseline copies the same
number of bytes between one pinned host tensor and one device tensor with a single `copy_`.
Goal: the reference at >= 80% of the baseline. Best of `--rounds`, CUDA synchronised around
every copy. Without CUDA it still runs (CPU pools, unpinned baseline) so it can be checked
anywhere, but only the GPU numbers mean anything.

    python3 benchmarks/bench_copies.py --pages 64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from bench_shared import HEAD_DIM, HEADS, PAGE_SIZE, layers_for

from reference.memory_pool import DeviceKVPool, HostKVPool, KVShape, device_to_host, host_to_device


def shape_for(part_bytes: int, page_size: int = PAGE_SIZE) -> KVShape:
    """A fp16 KV shape whose one page part (K or V) is `part_bytes`."""
    return KVShape(layers=max(1, layers_for(part_bytes, page_size)), heads=HEADS,
                   head_dim=HEAD_DIM)


def best_s(fn: Callable[[], None], rounds: int, cuda: bool) -> float:
    fn()  # warm-up (allocator, first-touch)
    times = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def spin_up(device: torch.device, seconds: float = 1.0) -> None:
    """Keep the GPU busy for a moment so that its clocks are up before the first measurement
    (the first size measured in a fresh process read 5-10 points low without it)."""
    if device.type != "cuda":
        return
    a = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a.add_(1)
        torch.cuda.synchronize()


def two_pass_d2h(dev: DeviceKVPool, host: HostKVPool, d_idx: torch.Tensor,
                 h_idx: torch.Tensor) -> None:
    """The previous write-through (a gather, then a separate transpose pass, then the DMA),
    kept only so one run can print it beside the fused path."""
    ps = host.page_size
    src = dev.buffer.index_select(2, d_idx)
    src = src.view(src.shape[0], src.shape[1], -1, ps, *src.shape[3:])
    src = src.permute(2, 1, 0, 3, 4, 5).contiguous()
    first = int(h_idx[0]) // ps
    host.buffer[first:first + src.shape[0]].copy_(src)


def two_pass_h2d(host: HostKVPool, dev: DeviceKVPool, h_idx: torch.Tensor,
                 d_idx: torch.Tensor) -> None:
    """The previous load-back (DMA, a transpose pass, then a scatter), for comparison only."""
    ps = host.page_size
    first, n = int(h_idx[0]) // ps, h_idx.numel() // ps
    src = host.buffer[first:first + n].to(dev.device, non_blocking=True)
    src = src.permute(2, 1, 0, 3, 4, 5).reshape(src.shape[2], src.shape[1], -1, *src.shape[4:])
    dev.buffer.index_copy_(2, d_idx, src)


def measure(part_bytes: int, pages: int, rounds: int, device: torch.device,
            page_size: int = 16) -> dict[str, float]:
    cuda = device.type == "cuda"
    shape = shape_for(part_bytes, page_size)
    dev = DeviceKVPool(shape, pages, page_size, device)
    host = HostKVPool(shape, pages, page_size, pin=cuda)
    dev.buffer.normal_()
    idx = torch.arange(pages * page_size)
    d_idx = idx.to(device)
    nbytes = dev.buffer.numel() * dev.buffer.element_size()
    # the cache passes CPU token indices (PageAllocator's); consecutive pages, as a fresh
    # allocation gives them, and a shuffled set
    shuffled = torch.randperm(pages)[:, None].mul(page_size).add(torch.arange(page_size)).view(-1)
    d2h = best_s(lambda: device_to_host(dev, host, idx, idx), rounds, cuda)
    assert torch.equal(host.buffer[0, 0, 0].to(device), dev.buffer[0, 0, :page_size]), "d2h wrong"
    d2h_shuf = best_s(lambda: device_to_host(dev, host, shuffled, idx), rounds, cuda)
    host.mapped_words = lambda _device: None  # the staged path: device pass, then DMA
    staged_d2h = best_s(lambda: device_to_host(dev, host, idx, idx), rounds, cuda)
    del host.mapped_words
    h2d = best_s(lambda: host_to_device(host, dev, idx, idx), rounds, cuda)
    h2d_shuf = best_s(lambda: host_to_device(host, dev, idx, shuffled), rounds, cuda)
    old_d2h = best_s(lambda: two_pass_d2h(dev, host, d_idx, idx), rounds, cuda)
    old_h2d = best_s(lambda: two_pass_h2d(host, dev, idx, d_idx), rounds, cuda)
    flat_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    base_d2h = best_s(lambda: flat_host.copy_(flat_dev, non_blocking=True), rounds, cuda)
    base_h2d = best_s(lambda: flat_dev.copy_(flat_host, non_blocking=True), rounds, cuda)
    gb = nbytes / 1e9
    return {"bytes": nbytes, "d2h": gb / d2h, "h2d": gb / h2d, "base_d2h": gb / base_d2h,
            "base_h2d": gb / base_h2d, "old_d2h": gb / old_d2h, "staged_d2h": gb / staged_d2h, "old_h2d": gb / old_h2d, "d2h_shuf": gb / d2h_shuf,
            "h2d_shuf": gb / h2d_shuf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--sizes-kib", default="64,256,1024", help="page part sizes")
    args = ap.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if use_cuda else "CPU (no CUDA: numbers not meaningful)"
    print(f"{name}; {args.pages} pages x 2 parts per copy, best of {args.rounds}; baseline: one "
          f"{'pinned ' if use_cuda else ''}copy_ of the same bytes\n")
    print("| page part | MiB moved | write-through d2h GB/s | pinned d2h GB/s | ratio "
          "| shuffled pages | staged | two-pass | load-back h2d GB/s | pinned h2d GB/s | ratio "
          "| shuffled pages | two-pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    spin_up(device)
    for kib in (int(k) for k in args.sizes_kib.split(",")):
        r = measure(kib << 10, args.pages, args.rounds, device)
        print(f"| {kib} KiB | {r['bytes'] / (1 << 20):.0f} | {r['d2h']:.2f} | {r['base_d2h']:.2f} "
              f"| {r['d2h'] / r['base_d2h']:.0%} | {r['d2h_shuf'] / r['base_d2h']:.0%} "
              f"| {r['staged_d2h'] / r['base_d2h']:.0%} | {r['old_d2h'] / r['base_d2h']:.0%} "
              f"| {r['h2d']:.2f} | {r['base_h2d']:.2f} | {r['h2d'] / r['base_h2d']:.0%} "
              f"| {r['h2d_shuf'] / r['base_h2d']:.0%} | {r['old_h2d'] / r['base_h2d']:.0%} |",
              flush=True)


if __name__ == "__main__":
    main()
