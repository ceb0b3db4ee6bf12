"""Prefetch throughput of the reference over Mooncake against raw batch_get from the same
client in the same run, for 64 KiB - 1 MiB page parts. Starts (and stops) its own master.

    python benchmarks/bench_mooncake_prefetch.py --pages 32 --rounds 7 --json out.json

Each round times, from the same idle state (`--settle-ms` without any Mooncake call first):
- reference: `add_request` until the final progress ack is agreed (hit query, agreement,
  batched reads, acks), `--batch-pages` pages per read;
- raw: one zero-copy `batch_get_into` of the same keys into the same registered host memory
  (Mooncake's call plus the result check; addresses computed before the clock starts);
- floor: `batch_exists` then that `batch_get_into`, back to back: the least any
  HiCache prefetch does (a hit query before the read), so `ref/floor` is the reference's own
  cost and `floor/raw` what the protocol's extra round trip costs.
With `--inflight K`, K requests (different prompts, `--pages` pages each) are added at once
and timed until every one's final ack is agreed, against K raw reads and K exists + read pairs
back to back: prefetch throughput, where SGLang's threads overlap one request's hit query with
another's reads (the floor does not, so ref/floor may pass 100%).
Best of `--rounds` each. A second table says where the reference's best round went: before
the hit query (add_request, hand-off to the prefetch thread, hashing, keys), the hit query's
batch_exists, agreement until the first read (incl. the hand-off to the IO thread), the reads
themselves, the gaps between batches and the tail until the final ack is agreed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from bench_shared import HEAD_DIM, HEADS, PAGE_SIZE, layers_for, print_breakdown, versions

from reference.api import (
    CacheConfig,
    KVShape,
    MooncakeConfig,
    MooncakeStorage,
    ParallelGroups,
    RankInfo,
    StorageError,
    open_rank,
    page_hashes,
)
from scenarios.core.contract import ExitCode
from scenarios.nemesis.mooncake_master import MooncakeMaster

#: SGLang's STORAGE_BATCH_SIZE (mem_cache/hicache_storage.py, 0.5.16-0.5.20): pages per L3 read
SGLANG_STORAGE_BATCH_SIZE = 128


class TimedMooncake(MooncakeStorage):
    """Logs (call, start, end) of each data call, to split the reference's time."""

    def __init__(self, config: MooncakeConfig) -> None:
        super().__init__(config)
        self.log: list[tuple[str, float, float]] = []

    def batch_exists(self, keys):  # noqa: ANN001, ANN201
        t = time.perf_counter()
        r = super().batch_exists(keys)
        self.log.append(("exists", t, time.perf_counter()))
        return r

    def batch_get(self, keys, targets):  # noqa: ANN001, ANN201
        t = time.perf_counter()
        r = super().batch_get(keys, targets)
        self.log.append(("get", t, time.perf_counter()))
        return r

    def batch_get_into(self, keys, ptrs, sizes):  # noqa: ANN001, ANN201
        t = time.perf_counter()
        r = super().batch_get_into(keys, ptrs, sizes)
        self.log.append(("get", t, time.perf_counter()))
        return r


def breakdown(log: list[tuple[str, float, float]], t0: float, t1: float) -> dict[str, float]:
    """Milliseconds per phase of one reference prefetch (see the module docstring); with
    several in flight, "exists" and "gets" add up every call (they may overlap)."""
    exists = [e for e in log if e[0] == "exists"]
    ex = exists[0]
    gets = [e for e in log if e[0] == "get"]
    ms = 1e3
    return {
        "to query": (ex[1] - t0) * ms,
        "exists": sum(b - a for _, a, b in exists) * ms,
        "to 1st get": (gets[0][1] - ex[2]) * ms,
        "gets": sum(b - a for _, a, b in gets) * ms,
        "between gets": sum(gets[i + 1][1] - gets[i][2] for i in range(len(gets) - 1)) * ms,
        "tail": (t1 - gets[-1][2]) * ms,
        "total": (t1 - t0) * ms,
    }


class _OneRank:
    rank = 0

    def new_groups(self, rank_sets, tag):  # noqa: ANN001, ANN201
        return []

    def all_reduce(self, tensor, op, group):  # noqa: ANN001, ANN201
        raise AssertionError("one rank: no collectives")


def shape_for(part_bytes: int) -> tuple[KVShape, int]:
    """A KV shape and page size whose one page part (K or V) is `part_bytes` of fp16."""
    return KVShape(layers=layers_for(part_bytes), heads=HEADS, head_dim=HEAD_DIM), PAGE_SIZE


def _wait_done(op, per_batch_acks: bool) -> None:  # noqa: ANN001
    """Until this rank's prefetch is over: the final ack agreed (per-batch-ack profiles, an
    Event: no polling thread competes for the GIL), else the IO thread's `io_done`."""
    if op.final_agreed.wait(30.0) if per_batch_acks else _poll(op):
        return
    raise RuntimeError(f"prefetch {op.request_id} did not finish in 30 s")


def _poll(op) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + 30.0
    while not op.io_done:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def run(master: str, part_bytes: int, pages: int, rounds: int, batch_pages: int,
        settle_s: float, inflight: int = 1) -> dict:
    """One page-part size: `inflight` requests of `pages` pages each, prefetched together
    (the prefetch thread queries the next one's hits while the IO thread reads), against as
    many raw reads and as many exists + read pairs, back to back."""
    kv, ps = shape_for(part_bytes)
    n = inflight * pages
    cfg = CacheConfig(page_size=ps, device_pages=n + 4, host_pages=2 * n + 8, kv=kv,
                      prefetch_stop_policy="wait_complete", prefetch_batch_pages=batch_pages,
                      key_prefix=f"bench{part_bytes}_")
    store = TimedMooncake(MooncakeConfig(master_address=master,
                                           global_segment_size=4 * n * part_bytes + (64 << 20),
                                           local_buffer_size=16 << 20))
    sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), _OneRank(), store)
    cache = sched.cache
    per_batch_acks = cache.cache_controller.per_batch_acks
    seqs = [list(range(i << 24, (i << 24) + pages * ps)) for i in range(inflight)]
    for i, tokens in enumerate(seqs):
        sched.add_request(f"warm{i}", tokens + [1])
        for _ in range(400):
            sched.step()
            if not sched.busy():
                break
            time.sleep(0.005)
    moved = n * len(kv.parts) * part_bytes
    keys = [[cache.key_suffix.key(h, p) for h in page_hashes(tokens, ps) for p in kv.parts]
            for tokens in seqs]
    deadline = time.monotonic() + 60
    while any(store.batch_exists(k) < len(k) for k in keys):  # every backup landed in L3
        if time.monotonic() > deadline:
            raise RuntimeError(f"{part_bytes >> 10} KiB: pages still missing in Mooncake "
                               f"after 60 s ({store.stats})")
        sched.step()
        time.sleep(0.01)
    ref_t, raw_t, floor_t, phases = [], [], [], []
    for r in range(rounds):
        sched.evict_device(1 << 30)
        sched.evict_host(1 << 30)
        store.log.clear()
        time.sleep(settle_s)
        t0 = time.perf_counter()
        for i, tokens in enumerate(seqs):
            sched.add_request(f"p{r}_{i}", tokens + [2])
        ops = [cache.ongoing_prefetch[f"p{r}_{i}"].operation for i in range(inflight)]
        for op in ops:
            _wait_done(op, per_batch_acks)
        t1 = time.perf_counter()
        short = [op.completed_tokens for op in ops if op.completed_tokens != pages * ps]
        if short:  # a round that moved less than raw does is no comparison
            raise RuntimeError(f"{part_bytes >> 10} KiB round {r}: prefetched {short} tokens, "
                               f"not {pages * ps} ({store.stats})")
        ref_t.append(t1 - t0)
        phases.append(breakdown(list(store.log), t0, t1))
        for _ in range(400):
            sched.step()
            if not sched.busy():
                break
        # raw and floor: the same keys, the same client, into the same registered host memory,
        # addresses computed before the clock starts (the reference computes its own inside)
        hosts = [cache.host_pool.allocator.alloc(pages * ps) for _ in seqs]
        assert all(h is not None for h in hosts)
        metas = [cache.host_pool.get_page_buffer_meta(h) for h in hosts]
        time.sleep(settle_s)
        t0 = time.perf_counter()
        oks = [store.batch_get_into(k, *m) for k, m in zip(keys, metas, strict=True)]
        raw_t.append(time.perf_counter() - t0)
        assert all(all(ok) for ok in oks), store.stats
        time.sleep(settle_s)
        t0 = time.perf_counter()
        for k, (ptrs, sizes) in zip(keys, metas, strict=True):
            hits = store.batch_exists(k)
            ok = store.batch_get_into(k[:hits], ptrs[:hits], sizes[:hits])
            assert hits == len(k) and all(ok)
        floor_t.append(time.perf_counter() - t0)
        for h in hosts:
            cache.host_pool.allocator.free(h)
    sched.shutdown()
    store.close()
    best = min(range(rounds), key=lambda i: ref_t[i])
    gbs = lambda ts: moved / min(ts) / 1e9  # noqa: E731
    return {
        "part_kib": part_bytes >> 10, "bytes": moved, "inflight": inflight,
        "ref_gbs": gbs(ref_t), "raw_gbs": gbs(raw_t), "floor_gbs": gbs(floor_t),
        "ratio": min(raw_t) / min(ref_t), "floor_ratio": min(raw_t) / min(floor_t),
        "ref_vs_floor": min(floor_t) / min(ref_t),
        "ref_ms": [t * 1e3 for t in ref_t], "raw_ms": [t * 1e3 for t in raw_t],
        "floor_ms": [t * 1e3 for t in floor_t], "breakdown_ms": phases[best],
    }


def _usage(message: str) -> None:
    print(f"bench_mooncake_prefetch: {message}", file=sys.stderr)
    sys.exit(ExitCode.USAGE)


def main() -> None:
    try:
        _main()
    except (RuntimeError, StorageError) as e:  # a round that cannot be compared, no master
        print(f"bench_mooncake_prefetch: cannot measure here: {e}", file=sys.stderr)
        sys.exit(ExitCode.UNKNOWN)


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-pages", type=int, default=SGLANG_STORAGE_BATCH_SIZE,
                    help="pages per prefetch IO batch (default: SGLang's STORAGE_BATCH_SIZE)")
    ap.add_argument("--sizes", default="64,256,1024", help="page part sizes in KiB")
    ap.add_argument("--settle-ms", type=float, default=20.0,
                    help="idle before each timed call, the same for reference, raw and floor")
    ap.add_argument("--inflight", type=int, default=1,
                    help="requests of --pages pages prefetched together (throughput; default 1:"
                         " one prefetch's latency)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure and round here")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        _usage(f"--sizes: want KiB numbers separated by commas, got {args.sizes!r}")
    if min(args.pages, args.rounds, args.batch_pages, args.inflight, *sizes) < 1:
        _usage("--pages, --rounds, --batch-pages, --inflight and --sizes must be positive")
    logging.disable(logging.WARNING)
    load0 = os.getloadavg()
    print(f"{args.inflight} request(s) in flight, each "
          f"{args.pages} pages x 2 parts, {args.batch_pages} pages per IO batch, best of "
          f"{args.rounds}, {args.settle_ms:g} ms idle before each timed call; load average "
          f"{load0[0]:.2f} on {os.cpu_count()} CPUs\n")
    print("| page part | reference GB/s | raw batch_get GB/s | exists + batch_get GB/s "
          "| reference / raw | floor / raw | reference / floor |")
    print("|---|---|---|---|---|---|---|")
    rows: list[dict] = []

    def save() -> None:  # after every size: a client that crashes on close loses nothing
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "load_before": load0,
                           "load_after": os.getloadavg(), **versions(), "rows": rows}, f,
                          indent=1)

    # a long client TTL: on a loaded box a late heartbeat must not drop the segment mid-run
    with MooncakeMaster(client_ttl_s=30) as m:
        for kib in sizes:
            row = run(m.address, kib << 10, args.pages, args.rounds, args.batch_pages,
                      args.settle_ms / 1e3, args.inflight)
            rows.append(row)
            save()
            print(f"| {kib} KiB | {row['ref_gbs']:.2f} | {row['raw_gbs']:.2f} | "
                  f"{row['floor_gbs']:.2f} | {row['ratio']:.0%} | {row['floor_ratio']:.0%} | "
                  f"{row['ref_vs_floor']:.0%} |", flush=True)
    print_breakdown("the reference's", rows, list(rows[0]["breakdown_ms"]))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        save()
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
