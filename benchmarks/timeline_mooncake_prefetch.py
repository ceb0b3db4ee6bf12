"""Where one reference prefetch over Mooncake spends its time, step by step and thread by thread.

Wraps the prefetch path's steps (scheduler side, hit query, agreement, IO, acks) with
timestamps, runs `--rounds` prefetches of `--pages` pages the way bench_mooncake_prefetch does
(the same idle before each), and prints the min and median of every step's start and duration,
then the best round's timeline. Gaps between one thread's end and the next thread's start are
the hand-offs. Starts (and stops) its own master.

    python benchmarks/timeline_mooncake_prefetch.py --part-kib 64 --rounds 15
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mooncake_prefetch as bench  # noqa: E402

import reference.cache_controller as cc  # noqa: E402
import reference.hiradix_cache as hc  # noqa: E402
import reference.memory_pool as mp  # noqa: E402
import reference.scheduler as sc  # noqa: E402
import reference.sync as sync  # noqa: E402
from scenarios.nemesis.mooncake_master import MooncakeMaster  # noqa: E402

Event = tuple[str, str, float, float]  # step, thread, start, end
LOG: list[Event] = []


def _wrap(owner: object, name: str, label: str | None = None) -> None:
    fn: Callable = getattr(owner, name)
    tag = label or name

    @functools.wraps(fn)
    def timed(*a, **k):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            LOG.append((tag, threading.current_thread().name, t, time.perf_counter()))

    setattr(owner, name, timed)


def instrument() -> None:
    for owner, name in [
        (sc.MiniScheduler, "add_request"), (hc.HiRadixCache, "match_prefix"),
        (hc.HiRadixCache, "prefetch_from_storage"), (mp.PageAllocator, "alloc"),
        (cc.HiCacheController, "prefetch"), (cc, "page_hashes"),
        (cc.HiCacheController, "flat_storage_keys"), (cc.HiCacheController, "_page_transfer"),
        (mp.HostKVPool, "get_page_buffer_meta"), (cc.HiCacheController, "decide"),
        (cc.HiCacheController, "_finish_io"), (cc.PrefetchOperation, "increment"),
        (sync.SyncGroup, "reduce"), (bench.MooncakeStorage, "_is_exist"),
        (bench.MooncakeStorage, "_get_into"),
    ]:
        if hasattr(owner, name):  # older trees lack some steps
            _wrap(owner, name)


def rounds(master: str, part_kib: int, pages: int, n: int, batch_pages: int,
           settle_s: float) -> list[tuple[float, float, list[Event]]]:
    kv, ps = bench.shape_for(part_kib << 10)
    cfg = bench.CacheConfig(page_size=ps, device_pages=pages + 4, host_pages=2 * pages + 8,
                            kv=kv, prefetch_stop_policy="wait_complete",
                            prefetch_batch_pages=batch_pages, key_prefix=f"tl{part_kib}_")
    store = bench.TimedMooncake(bench.MooncakeConfig(
        master_address=master, global_segment_size=4 * pages * (part_kib << 10) + (64 << 20),
        local_buffer_size=16 << 20))
    sched = bench.open_rank(cfg, bench.RankInfo(), bench.ParallelGroups(tp=(0,)),
                            bench._OneRank(), store)
    per_batch_acks = sched.cache.cache_controller.per_batch_acks
    tokens = list(range(pages * ps))
    out = []
    try:
        sched.add_request("warm", tokens + [1])
        for _ in range(400):
            sched.step()
            if not sched.busy():
                break
            time.sleep(0.005)
        for r in range(n):
            sched.evict_device(1 << 30)
            sched.evict_host(1 << 30)
            time.sleep(settle_s)
            LOG.clear()
            t0 = time.perf_counter()
            sched.add_request(f"p{r}", tokens + [2])
            bench._wait_done(sched.cache.ongoing_prefetch[f"p{r}"].operation, per_batch_acks)
            t1 = time.perf_counter()
            out.append((t0, t1, list(LOG)))
            for _ in range(400):
                sched.step()
                if not sched.busy():
                    break
    finally:
        sched.shutdown()
        store.close()
    return out


def report(runs: list[tuple[float, float, list[Event]]]) -> None:
    per: dict[str, list[float]] = collections.defaultdict(list)
    order: list[str] = []
    for t0, t1, events in runs:
        per["TOTAL dur"].append(t1 - t0)
        seen: collections.Counter[str] = collections.Counter()
        for step, _, a, b in sorted(events, key=lambda e: e[2]):
            seen[step] += 1
            name = f"{step}#{seen[step]}"
            if name not in order:
                order.append(name)
            per[f"{name} start"].append(a - t0)
            per[f"{name} dur"].append(b - a)
    print("| step | start min | start median | ms min | ms median |")
    print("|---|---|---|---|---|")
    t = per["TOTAL dur"]
    print(f"| total | | | {min(t) * 1e3:.3f} | {statistics.median(t) * 1e3:.3f} |")
    for name in order:
        s, d = per[f"{name} start"], per[f"{name} dur"]
        print(f"| {name} | {min(s) * 1e3:.3f} | {statistics.median(s) * 1e3:.3f} | "
              f"{min(d) * 1e3:.3f} | {statistics.median(d) * 1e3:.3f} |")
    t0, t1, events = min(runs, key=lambda r: r[1] - r[0])
    print(f"\nbest round, {(t1 - t0) * 1e3:.3f} ms (start, end, ms, thread, step):")
    for step, thread, a, b in sorted(events, key=lambda e: e[2]):
        print(f"{(a - t0) * 1e3:8.3f} {(b - t0) * 1e3:8.3f} {(b - a) * 1e3:7.3f}  "
              f"{thread:24s} {step}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part-kib", type=int, default=64)
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch-pages", type=int, default=bench.SGLANG_STORAGE_BATCH_SIZE)
    ap.add_argument("--settle-ms", type=float, default=20.0)
    args = ap.parse_args()
    if min(args.part_kib, args.pages, args.rounds, args.batch_pages) < 1:
        bench._usage("--part-kib, --pages, --rounds and --batch-pages must be positive")
    logging.disable(logging.WARNING)
    instrument()
    with MooncakeMaster(client_ttl_s=30) as m:
        runs = rounds(m.address, args.part_kib, args.pages, args.rounds, args.batch_pages,
                      args.settle_ms / 1e3)
    report(runs)


if __name__ == "__main__":
    main()
