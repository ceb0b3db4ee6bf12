"""Prefetch throughput of the reference over Mooncake against raw batch_get from the same
client in the same run, for 64 KiB - 1 MiB page parts. Starts (and stops) its own master.

    python benchmarks/bench_mooncake_prefetch.py --pages 64

A second table says where the reference's time goes in its best round: before the hit query
(add_request + hand-off to the prefetch thread), the hit query's batch_exists, hashing and
agreement until the first read (incl. the hand-off to the IO thread), the reads themselves,
the gaps between batches (acks, key and target building) and the tail until `io_done` is seen.
"""

from __future__ import annotations

import argparse
import logging
import time

from reference.api import (
    CacheConfig,
    KVShape,
    MooncakeConfig,
    MooncakeStorage,
    ParallelGroups,
    RankInfo,
    open_rank,
    page_hashes,
)
from scenarios.mooncake_master import MooncakeMaster


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


def breakdown(log: list[tuple[str, float, float]], t0: float, t1: float) -> dict[str, float]:
    """Milliseconds per phase of one reference prefetch (see the module docstring)."""
    ex = next(e for e in log if e[0] == "exists")
    gets = [e for e in log if e[0] == "get"]
    ms = 1e3
    return {
        "to query": (ex[1] - t0) * ms,
        "exists": (ex[2] - ex[1]) * ms,
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
    page_size, heads, head_dim = 16, 8, 128
    layers = part_bytes // (page_size * heads * head_dim * 2)
    return KVShape(layers=layers, heads=heads, head_dim=head_dim), page_size


def run(master: str, part_bytes: int, pages: int, rounds: int,
        args_batch: int) -> tuple[float, float, dict[str, float]]:
    kv, ps = shape_for(part_bytes)
    cfg = CacheConfig(page_size=ps, device_pages=pages + 4, host_pages=2 * pages + 8, kv=kv,
                      prefetch_stop_policy="wait_complete", prefetch_batch_pages=args_batch,
                      key_prefix=f"bench{part_bytes}_")
    store = TimedMooncake(MooncakeConfig(master_address=master,
                                           global_segment_size=4 * pages * part_bytes + (64 << 20),
                                           local_buffer_size=16 << 20))
    sched = open_rank(cfg, RankInfo(), ParallelGroups(tp=(0,)), _OneRank(), store)
    cache = sched.cache
    tokens = list(range(pages * ps))
    sched.add_request("warm", tokens + [1])
    for _ in range(200):
        sched.step()
        if not sched.busy():
            break
        time.sleep(0.005)
    moved = pages * len(kv.parts) * part_bytes
    ref_t, raw_t, phases = [], [], []
    for r in range(rounds):
        sched.evict_device(1 << 30)
        sched.evict_host(1 << 30)
        store.log.clear()
        t0 = time.perf_counter()
        sched.add_request(f"p{r}", tokens + [2])
        op = cache.ongoing_prefetch[f"p{r}"].operation
        while not op.io_done:
            time.sleep(0.0002)
        t1 = time.perf_counter()
        ref_t.append(t1 - t0)
        phases.append(breakdown(list(store.log), t0, t1))
        for _ in range(200):
            sched.step()
            if not sched.busy():
                break
        # raw: the same keys, the same client, into the same registered host memory
        keys = [cache.key_suffix.key(h, p) for h in page_hashes(tokens, ps) for p in kv.parts]
        host = cache.host_pool.allocator.alloc(pages * ps)
        assert host is not None
        targets = [t for page in cache.host_pool.page_parts(host) for t in page]
        t0 = time.perf_counter()
        ok = store.batch_get(keys, targets)
        raw_t.append(time.perf_counter() - t0)
        assert all(ok), ([i for i, g in enumerate(ok) if not g], store.stats)
        cache.host_pool.allocator.free(host)
    sched.shutdown()
    store.close()
    best = min(range(rounds), key=lambda i: ref_t[i])
    return moved / min(ref_t) / 1e9, moved / min(raw_t) / 1e9, phases[best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-pages", type=int, default=16, help="pages per prefetch IO batch")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    print(f"{args.pages} pages x 2 parts, {args.batch_pages} pages per IO batch, best of "
          f"{args.rounds}; reference = hit query + agreement + batched reads + acks\n")
    print("| page part | reference prefetch GB/s | raw batch_get GB/s | ratio |")
    print("|---|---|---|---|")
    rows = []
    # a long client TTL: on a loaded box a late heartbeat must not drop the segment mid-run
    with MooncakeMaster(client_ttl_s=30) as m:
        for kib in (64, 256, 1024):
            ref, raw, ph = run(m.address, kib << 10, args.pages, args.rounds, args.batch_pages)
            rows.append((kib, ph))
            print(f"| {kib} KiB | {ref:.2f} | {raw:.2f} | {ref / raw:.0%} |", flush=True)
    names = list(rows[0][1])
    print("\nwhere the reference's best round went (ms)\n")
    print("| page part | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for kib, ph in rows:
        print(f"| {kib} KiB | " + " | ".join(f"{ph[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
