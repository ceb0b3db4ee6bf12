"""Prefetch latency of SGLang's OWN HiCache over its OWN MooncakeStore, for one request, against
raw batch_get from the same Mooncake client in the same run: the comparison
`bench_mooncake_prefetch.py` makes for the reference, made for the system it is a reference of.

    python benchmarks/bench_sglang_prefetch.py [--release 0.5.20] [--pages 32] [--rounds 15]
        [--sizes 64,256,1024] [--settle-ms 20] [--poll-us 200] [--json out.json]

The parent starts (and stops) its own `mooncake_master` and runs one child in the release's
CPU environment (build/sglang-envs/<V> + base, see scenarios/sut/sglang/envs.py) that builds, per
page-part size, SGLang's real `HiRadixCache` + `HiCacheController` (world of one rank on gloo:
SGLang's `init_distributed_environment` + `initialize_model_parallel`, as scenarios/sglang does)
with `hicache_storage_backend="mooncake"`: SGLang's `MooncakeStore`, its zero-copy
`batch_get_v1` / `batch_set_v1` path, its `MooncakeHostTensorAllocator` and the page-first host
layout (`page_first_direct` + `direct` IO: `kernel` IO is CUDA-only, and `page_first_direct`
keeps one page part, K or V of one page across layers, contiguous, like the reference's). KV
shape as the reference benchmark's `shape_for`: page 16, 8 heads, head dim 128, fp16,
layers = part // 32 KiB.

The prompt's `--pages` pages are put into Mooncake through SGLang's own store
(`batch_set_v1`) under the keys SGLang's prefetch looks up: `get_storage_hash_str` of the
prompt's RadixKey (0.5.20; earlier, the controller's page-by-page `get_hash_str` chain), as
`_storage_hit_query` computes them, tagged and suffixed by the store
(`{tag}_{model}_{hash}_{tp}_k|v`). Round 0 checks that the prefetch asked for those very keys
and that the bytes it landed in host memory are the bytes written; every later round must read
the same key strings.

Each round, from the same idle state (`--settle-ms` without any Mooncake call first):
- SGLang: device and host evicted (the prompt is in L3 only), the scheduler's match, then timed
  from `HiRadixCache.prefetch_from_storage` (as the scheduler's `_prefetch_kvcache` calls it)
  until the scheduler thread sees the prefetch's completed tokens reach every page. On 0.5.20
  that takes SGLang's whole pipeline: the prefetch thread's hit query (`batch_exists`), the hand-
  off on `prefetch_hit_queue` to the scheduler, which allocates host pages in
  `check_hicache_events()` and queues the op for the IO thread, the IO thread's
  `batch_get_v1` (STORAGE_BATCH_SIZE = 128 pages per read), its progress ack through the sync
  thread, and the scheduler's drain of that ack (before 0.5.16 the prefetch thread allocates
  and the IO thread raises `completed_tokens` itself). "Done" is observed as the scheduler does:
  the main (scheduler) thread calls `check_hicache_events()` then `check_prefetch_progress()`,
  sleeping `--poll-us` between passes (no extra thread competes for the GIL; the real scheduler
  spins through its event loop instead). The poll period is part of SGLang's cost here: each
  scheduler hand-off waits up to one period, and each pass competes with the IO thread for the
  GIL and the CPUs (try --poll-us 50 / 1000). `check_prefetch_progress` turning True (the final
  ack drained, pages inserted into the tree) is reported in the breakdown as "ready".
- raw: one `batch_get_into` of the same keys (the strings SGLang passed to the client) on the
  same client into the same registered host pool, addresses computed before the clock starts;
- floor: `batch_is_exist` then that `batch_get_into` on the client, back to back: the least any
  HiCache prefetch does (a hit query before the read).
Best of `--rounds` each. A round whose prefetch moved fewer pages than raw is refused (exit 125).
A second table splits SGLang's best round: before the hit query (prefetch_from_storage, hand-off
to the prefetch thread, hashing, keys), SGLang's `batch_exists`, to the first read (scheduler
pickup + host allocation + hand-off to the IO thread), `batch_get_v1`, the gaps between reads,
the tail until the scheduler saw every page, "ready" after that, and how much of `batch_get_v1`
was the Mooncake client's `batch_get_into` itself (the rest: SGLang's key and address lists).

Exit: 0 ok, 2 bad flags, 125 cannot measure here (no env for the release, no mooncake, a round
that moved too little, SGLang failing to build), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_shared import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    PAGE_SIZE,
    layers_for,
    print_breakdown,
    versions,
)

from scenarios.core.contract import ExitCode  # noqa: E402

#: host pool = HOST_RATIO x device pool: the prefetched prompt, raw's buffer and headroom (and
#: SGLang rate-limits prefetch above half the host pool)
HOST_RATIO = 3.0
ROW, INFO, ERROR = "@@ROW ", "@@INFO ", "@@ERROR "
PHASES = ("to query", "exists", "to 1st get", "gets", "between gets", "tail", "total", "ready",
          "client's part of gets")


class CannotMeasure(RuntimeError):
    """This run cannot give an honest number (exit 125)."""


# ============================================================================== child side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sglang() -> dict[str, Any]:
    """SGLang's imports under the CPU shim and its parallel state for a world of one rank."""
    from scenarios.sut.sglang import adapters, quick_reset, shim

    shim.install()
    import sglang.srt.managers.cache_controller as cc_mod
    import sglang.srt.mem_cache.hiradix_cache as hr
    from sglang.srt.distributed import parallel_state as ps

    shim.patch_loaded()
    quick_reset.install(cc_mod)  # no idle second per cache construction
    try:  # 0.5.15+: JIT-compiled page hashing, compiled once by the env's import check
        from sglang.srt.mem_cache.utils import get_hash_str
    except ImportError:
        from sglang.srt.mem_cache.hicache_storage import get_hash_str
    get_hash_str([1, 2, 3, 4], None)
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                    distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    adapters.call_filtered(ps.initialize_model_parallel, tensor_model_parallel_size=1,
                           attention_context_model_parallel_size=1, backend="gloo")
    return {"cc_mod": cc_mod, "hr": hr, "ps": ps}


def _model_dir(sg: dict, layers: int) -> str:
    """A directory with only a config.json: ServerArgs needs a model path, never weights."""
    d = tempfile.mkdtemp(prefix="model-", dir=sg["scratch"])
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": HEADS * HEAD_DIM, "num_attention_heads": HEADS,
                   "num_key_value_heads": HEADS, "num_hidden_layers": layers,
                   "intermediate_size": 64, "vocab_size": 32000,
                   "max_position_embeddings": 1 << 20, "torch_dtype": "float16"}, f)
    return d


def build_cache(sg: dict, part_bytes: int, pages: int, master: str, tag: str) -> Any:
    """SGLang's HiRadixCache on CPU pools, storage backend "mooncake" configured the way a user
    does (hicache_storage_backend_extra_config), prefetch policy wait_complete."""
    import sglang.srt.layers.dp_attention as dpa
    import torch
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from scenarios.sut.sglang import adapters

    ps_mod = sg["ps"]
    layers = layers_for(part_bytes)
    device_tokens = (pages + 4) * PAGE_SIZE
    kv = adapters.call_filtered(MHATokenToKVPool, size=device_tokens, page_size=PAGE_SIZE,
                                dtype=torch.float16, head_num=HEADS, head_dim=HEAD_DIM,
                                layer_num=layers, device="cpu", enable_memory_saver=False)
    alloc = adapters.call_filtered(PagedTokenToKVPoolAllocator, size=device_tokens,
                                   page_size=PAGE_SIZE, dtype=torch.float16, device="cpu",
                                   kvcache=kv, need_sort=False)
    req_pool = adapters.call_filtered(ReqToTokenPool, size=8, max_context_len=device_tokens + 64,
                                      device="cpu", enable_memory_saver=False)
    extra = {"prefetch_threshold": PAGE_SIZE, "prefetch_timeout_base": 1e9,
             "prefetch_timeout_per_ki_token": 0,
             "master_server_address": master, "local_hostname": "127.0.0.1",
             "metadata_server": "P2PHANDSHAKE", "protocol": "tcp", "device_name": "",
             "global_segment_size": 4 * pages * 2 * part_bytes + (64 << 20),
             "check_server": False, "standalone_storage": False, "extra_backend_tag": tag}
    dpa._ENABLE_DP_ATTENTION_FLAG = False
    if getattr(dpa, "_ATTN_DP_RANK", None) is None:
        dpa._ATTN_DP_RANK = 0
    server_args = adapters.server_args(
        _model_dir(sg, layers), dp_attention=False, tp=1, page_size=PAGE_SIZE,
        hicache_ratio=HOST_RATIO, hicache_size=0, hicache_mem_layout="page_first_direct",
        hicache_io_backend="direct", hicache_storage_backend="mooncake",
        hicache_storage_backend_extra_config=json.dumps(extra),
        hicache_storage_prefetch_policy="wait_complete", hicache_write_policy="write_through")
    adapters.set_dp_attention(False)  # after publishing the server args
    tp, attn_tp, attn_cp = (ps_mod.get_tp_group(), ps_mod.get_attn_tp_group(),
                            ps_mod.get_attn_cp_group())
    params = adapters.cache_init_params(
        req_to_token_pool=req_pool, token_to_kv_pool_allocator=alloc, page_size=PAGE_SIZE,
        disable=False, tp_cache_group=tp.cpu_group, attn_cp_cache_group=attn_cp.cpu_group,
        attn_tp_cache_group=attn_tp.cpu_group, attn_cp_rank=0, attn_cp_size=1, pp_rank=0,
        pp_size=1, pp_cache_group=getattr(ps_mod.get_pp_group(), "cpu_group", None))
    cache = sg["hr"].HiRadixCache(params, server_args)
    cc = cache.cache_controller
    for _ in range(2000):  # the prefetch thread makes its IO buffer when it starts
        if hasattr(cc, "prefetch_buffer"):
            break
        time.sleep(0.005)
    return cache


def path_info(cache: Any) -> dict[str, Any]:
    """Which of SGLang's paths this cache takes (a fallback would make the number meaningless)."""
    cc = cache.cache_controller
    host = cc.mem_pool_host
    store = cc.storage_backend
    info = {"store": type(store).__name__, "page_get": cc.page_get_func.__name__,
            "host_layout": host.layout,
            "host_memory": type(getattr(host, "allocator", None)).__name__,
            "per_batch_acks": hasattr(cc, "prefetch_sync_queue"),
            "hit_queue": hasattr(cc, "prefetch_hit_queue"),
            "client": type(store.store).__name__}
    try:
        from sglang.srt.mem_cache.hicache_storage import STORAGE_BATCH_SIZE
        info["storage_batch_pages"] = STORAGE_BATCH_SIZE
    except ImportError:
        info["storage_batch_pages"] = None
    if info["store"] != "MooncakeStore" or info["page_get"] != "_page_get_zero_copy":
        raise CannotMeasure(f"SGLang did not take its zero-copy Mooncake path: {info}")
    return info


def storage_keys(sg: dict, cache: Any, tokens: list[int]) -> list[str]:
    """The page hashes SGLang's hit query computes for a prompt matched nowhere (the last hash
    of the root is None): `get_storage_hash_str` of the page-aligned RadixKey that
    `prefetch_from_storage` builds (no extra key, no cache salt); before 0.5.20, the
    controller's `get_hash_str` chained page by page."""
    import inspect

    from sglang.srt.mem_cache.radix_cache import RadixKey

    kw = {"extra_key": None, "is_bigram": getattr(cache, "is_eagle", False), "cache_salt": None}
    accepted = inspect.signature(RadixKey).parameters
    key = RadixKey(list(tokens), **{k: v for k, v in kw.items() if k in accepted})
    if hasattr(key, "page_aligned"):
        key = key.page_aligned(PAGE_SIZE)
    fn = getattr(sg["cc_mod"], "get_storage_hash_str", None)
    if fn is not None:  # 0.5.20
        return list(fn(key, None, page_size=PAGE_SIZE))
    chain = getattr(cache.cache_controller, "get_hash_str", None)  # earlier: a per-page chain
    if chain is None:
        raise CannotMeasure("cannot tell how this release names its storage pages")
    out: list[str] = []
    last = None
    for i in range(0, len(tokens) // PAGE_SIZE * PAGE_SIZE, PAGE_SIZE):
        last = chain(list(tokens[i:i + PAGE_SIZE]), last)
        out.append(last)
    return out


def _digests(host: Any, host_indices: Any) -> list[str]:
    ptrs, sizes = host.get_page_buffer_meta(host_indices)
    return [hashlib.blake2b(ctypes.string_at(p, s), digest_size=8).hexdigest()
            for p, s in zip(ptrs, sizes, strict=True)]


def put_prompt(cache: Any, hashes: list[str]) -> list[str]:
    """Random page parts written through SGLang's own `batch_set_v1`; their digests."""
    host = cache.cache_controller.mem_pool_host
    store = cache.cache_controller.storage_backend
    idx = host.alloc(len(hashes) * PAGE_SIZE)
    if idx is None:
        raise CannotMeasure("SGLang's host pool has no room for the prompt")
    ptrs, sizes = host.get_page_buffer_meta(idx)
    for p, s in zip(ptrs, sizes, strict=True):
        ctypes.memmove(p, os.urandom(s), s)
    want = _digests(host, idx)
    ok = store.batch_set_v1(hashes, idx)
    host.free(idx)
    if not all(ok):
        raise CannotMeasure(f"SGLang's batch_set_v1 stored {sum(map(bool, ok))} of "
                            f"{len(hashes)} pages")
    deadline = time.monotonic() + 60
    while store.batch_exists(hashes) < len(hashes):
        if time.monotonic() > deadline:
            raise CannotMeasure("pages still missing in Mooncake 60 s after batch_set_v1")
        time.sleep(0.01)
    return want


class Timed:
    """Logs (call, start, end) of SGLang's store calls, and the key strings it read."""

    def __init__(self, store: Any) -> None:
        self.log: list[tuple[str, float, float]] = []
        self.sent: list[list[str]] = []
        for name, tag in (("batch_exists", "exists"), ("batch_get_v1", "get")):
            setattr(store, name, self._wrap(getattr(store, name), tag))
        inner = store._get_batch_zero_copy_impl

        def get_impl(key_strs: list[str], *a: Any, **k: Any) -> Any:
            self.sent.append(list(key_strs))
            t = time.perf_counter()
            out = inner(key_strs, *a, **k)
            self.log.append(("client get", t, time.perf_counter()))
            return out
        store._get_batch_zero_copy_impl = get_impl

    def _wrap(self, fn: Callable, tag: str) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = fn(*a, **k)
            self.log.append((tag, t, time.perf_counter()))
            return out
        return timed


def breakdown(log: list[tuple[str, float, float]], t0: float, t1: float,
              t_ready: float) -> dict[str, float]:
    """Milliseconds per phase of one SGLang prefetch (the module docstring names them)."""
    ex = next(e for e in log if e[0] == "exists")
    gets = [e for e in log if e[0] == "get"]
    ms = 1e3
    return {
        "to query": (ex[1] - t0) * ms,
        "exists": sum(b - a for n, a, b in log if n == "exists") * ms,
        "to 1st get": (gets[0][1] - ex[2]) * ms,
        "gets": sum(b - a for _, a, b in gets) * ms,
        "between gets": sum(gets[i + 1][1] - gets[i][2] for i in range(len(gets) - 1)) * ms,
        "tail": (t1 - gets[-1][2]) * ms,
        "total": (t1 - t0) * ms,
        "ready": (t_ready - t1) * ms,
        "client's part of gets": sum(b - a for n, a, b in log if n == "client get") * ms,
    }


def _rid_arg(fn: Callable, rid: str) -> Any:
    from scenarios.sut.sglang import adapters

    return adapters._rid_arg(fn, rid)


def clear_tree(cache: Any, tokens: list[int]) -> Any:
    """Evict device and host, so the prompt is in L3 only; the scheduler's match of it."""
    from scenarios.sut.sglang import adapters

    adapters.evict(cache, 1 << 30)
    cache.evict_host(1 << 30)
    m = adapters.match(cache, tokens)
    if len(m.device_indices) or m.host_hit_length:
        raise CannotMeasure(f"eviction left {len(m.device_indices)} device and "
                            f"{m.host_hit_length} host tokens of the prompt")
    return m


def wait_prefetch(cache: Any, op: Any, handle: Any, want: int, poll_s: float
                  ) -> tuple[float | None, float]:
    """The scheduler's loop on the main thread: `check_hicache_events()` (host allocation for
    the hit, drain of progress acks), then `check_prefetch_progress()`. Returns (when the
    completed tokens reached `want`, or None if they never did; when the request was ready)."""
    events = getattr(cache, "check_hicache_events", None)
    t_full = None
    deadline = time.monotonic() + 30.0
    while True:
        if events is not None:
            events()
        if t_full is None and op.completed_tokens >= want:
            t_full = time.perf_counter()
        if cache.check_prefetch_progress(handle):
            return t_full, time.perf_counter()
        if time.monotonic() > deadline:
            raise CannotMeasure(f"SGLang's prefetch did not finish in 30 s "
                                f"({op.completed_tokens} of {want} tokens)")
        time.sleep(poll_s)


def measure(sg: dict, part_bytes: int, cfg: dict) -> tuple[dict, dict]:
    """One page-part size: (row, path info)."""
    pages, rounds, settle_s = cfg["pages"], cfg["rounds"], cfg["settle_ms"] / 1e3
    poll_s = cfg["poll_us"] / 1e6
    kib = part_bytes >> 10
    cache = build_cache(sg, part_bytes, pages, cfg["master"], f"bench{kib}k{os.getpid()}")
    cc = cache.cache_controller
    store, host = cc.storage_backend, cc.mem_pool_host
    client = store.store
    try:
        info = path_info(cache)
        want = pages * PAGE_SIZE
        tokens = list(range(1000 + kib * 100_000, 1000 + kib * 100_000 + want))
        hashes = storage_keys(sg, cache, tokens)
        digests = put_prompt(cache, hashes)
        timed = Timed(store)
        moved = pages * 2 * part_bytes
        sg_t, raw_t, floor_t, phases = [], [], [], []
        key_strs: list[str] = []
        for r in range(rounds):
            m = clear_tree(cache, tokens)
            last = m.last_host_node
            rid = f"bench{kib}_{r}"
            start_handle = _rid_arg(cache.prefetch_from_storage, rid)
            check_handle = _rid_arg(cache.check_prefetch_progress, rid)
            last_hash = cache.get_last_hash_value(last) if hasattr(
                cache, "get_last_hash_value") else None
            timed.log.clear()
            timed.sent.clear()
            time.sleep(settle_s)
            t0 = time.perf_counter()
            cache.prefetch_from_storage(start_handle, last, tokens, last_hash)
            if rid not in cache.ongoing_prefetch:
                raise CannotMeasure("SGLang did not start a prefetch (rate limit or threshold)")
            # (node, key, operation) on 0.5.20, (node, key, host indices, operation) before
            op = next(x for x in cache.ongoing_prefetch[rid] if hasattr(x, "completed_tokens"))
            t1, t_ready = wait_prefetch(cache, op, check_handle, want, poll_s)
            if hasattr(cache, "pop_prefetch_loaded_tokens"):
                cache.pop_prefetch_loaded_tokens(check_handle)
            if t1 is None:  # a round that moved less than raw does is no comparison
                raise CannotMeasure(f"{kib} KiB round {r}: SGLang prefetched "
                                    f"{op.completed_tokens} of {want} tokens")
            sg_t.append(t1 - t0)
            phases.append(breakdown(list(timed.log), t0, t1, t_ready))
            sent = [k for batch in timed.sent for k in batch]
            if r == 0:
                key_strs = sent
                if list(op.hash_value) != hashes:
                    raise CannotMeasure("SGLang's prefetch looked up other keys than the ones "
                                        "written")
                if _digests(host, op.host_indices[:want]) != digests:
                    raise CannotMeasure("SGLang's prefetch landed other bytes than written")
            elif sent != key_strs:
                raise CannotMeasure(f"round {r} read other keys than round 0")
            raw, floor = raw_and_floor(store, host, client, hashes, key_strs, settle_s)
            raw_t.append(raw)
            floor_t.append(floor)
        info["keys_per_read"] = len(key_strs)
        info["key_example"] = key_strs[0] if key_strs else ""
    finally:
        teardown(cache, client)
    best = min(range(rounds), key=lambda i: sg_t[i])

    def gbs(ts: list[float]) -> float:
        return moved / min(ts) / 1e9
    row = {"part_kib": kib, "bytes": moved, "pages": pages,
           "sglang_gbs": gbs(sg_t), "raw_gbs": gbs(raw_t), "floor_gbs": gbs(floor_t),
           "ratio": min(raw_t) / min(sg_t), "floor_ratio": min(raw_t) / min(floor_t),
           "sglang_vs_floor": min(floor_t) / min(sg_t),
           "sglang_ms": [t * 1e3 for t in sg_t], "raw_ms": [t * 1e3 for t in raw_t],
           "floor_ms": [t * 1e3 for t in floor_t], "breakdown_ms": phases[best],
           "ready_ms": [p["total"] + p["ready"] for p in phases]}
    return row, info


def raw_and_floor(store: Any, host: Any, client: Any, hashes: list[str], key_strs: list[str],
                  settle_s: float) -> tuple[float, float]:
    """Raw batch_get_into, then exists + batch_get_into, of the keys SGLang read, on its client,
    into fresh pages of its registered host pool (addresses computed before the clock)."""
    idx = host.alloc(len(hashes) * PAGE_SIZE)
    if idx is None:
        raise CannotMeasure("SGLang's host pool has no room for the raw read")
    try:
        keys, ptrs, sizes = store._batch_preprocess(store._tag_keys(hashes), idx)
        if list(keys) != key_strs:
            raise CannotMeasure("the raw read's keys differ from the ones SGLang read")
        time.sleep(settle_s)
        t0 = time.perf_counter()
        got = client.batch_get_into(keys, ptrs, sizes)
        raw = time.perf_counter() - t0
        if any(g != s for g, s in zip(got, sizes, strict=True)):
            raise CannotMeasure(f"raw batch_get_into read {got[:4]}... bytes, not {sizes[0]}")
        time.sleep(settle_s)
        t0 = time.perf_counter()
        codes = client.batch_is_exist(keys)
        hits = next((i for i, c in enumerate(codes) if c != 1), len(codes))
        got = client.batch_get_into(keys[:hits], ptrs[:hits], sizes[:hits])
        floor = time.perf_counter() - t0
        if hits != len(keys) or any(g != s for g, s in zip(got, sizes, strict=True)):
            raise CannotMeasure(f"floor read {hits} of {len(keys)} page parts")
    finally:
        host.free(idx)
    return raw, floor


def teardown(cache: Any, client: Any) -> None:
    """Detach SGLang's storage (stops its threads), then close the Mooncake client."""
    import atexit

    with contextlib.suppress(Exception):
        cache.shutdown()
    atexit.unregister(cache.shutdown)
    with contextlib.suppress(Exception):
        client.close()


def child_main(cfg: dict) -> int:
    import logging

    logging.disable(logging.WARNING)
    try:
        sg = {**start_sglang(), "scratch": cfg["scratch"]}
        for kib in cfg["sizes"]:
            row, info = measure(sg, kib << 10, cfg)
            print(INFO + json.dumps({"part_kib": kib, **info}), flush=True)
            print(ROW + json.dumps(row), flush=True)
    except CannotMeasure as e:
        print(ERROR + str(e), flush=True)
        return int(ExitCode.UNKNOWN)
    return 0


# ============================================================================== parent side


def _dies_with_parent(cmd: list[str]) -> list[str]:
    """The child gets SIGTERM when the parent dies, however it ends (`setpriv --pdeathsig`,
    as the master's launcher does; setpriv execs, so the pid stays the child's)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *cmd] if setpriv else cmd


def child_env(release: str) -> dict[str, str]:
    from scenarios.sut.sglang import envs, mooncake

    pp = os.pathsep.join([str(REPO), envs.pythonpath(release)]
                         + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {**os.environ, "PYTHONPATH": pp, "SGLANG_LOG_LEVEL": "error",
            "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
            "TORCH_EXTENSIONS_DIR": envs.torch_extensions_dir(release),
            **mooncake.worker_env()}


def check_release(release: str) -> None:
    """2 for a malformed release number, 125 for one without a built environment."""
    from scenarios.core.errors import UsageError
    from scenarios.sut.sglang import envs

    try:
        envs.parse_release(release)
    except UsageError as e:
        _usage(f"--release: {e}")
    man = envs.load_manifest(release)
    if man is None or not man.ok or not envs.release_dir(release).is_dir():
        raise CannotMeasure(f"no environment for sglang {release} under {envs.ROOT} "
                            f"(build it: python -m scenarios.sut.sglang.envs {release})")


def run_child(args: argparse.Namespace, master: str, scratch: str,
              on_row: Callable[[dict, dict], None]) -> None:
    """The child in the release's environment; its rows as they come. Killed on any exit."""
    cfg = {"release": args.release, "pages": args.pages, "rounds": args.rounds,
           "sizes": args.size_list, "settle_ms": args.settle_ms, "poll_us": args.poll_us,
           "master": master, "scratch": scratch}
    fd, log_path = tempfile.mkstemp(prefix="bench-sglang-prefetch-", suffix=".log")
    error, info, code = "", {}, None
    with os.fdopen(fd, "w") as log:
        cmd = _dies_with_parent([sys.executable, __file__, "--child", json.dumps(cfg)])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                env=child_env(args.release))
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(INFO):
                    info = json.loads(line[len(INFO):])
                elif line.startswith(ROW):
                    on_row(json.loads(line[len(ROW):]), info)
                elif line.startswith(ERROR):
                    error = line[len(ERROR):].strip()
                else:
                    log.write(line)
            code = proc.wait()
        except BaseException:  # Ctrl-C, a broken row: the log is of no use to anyone
            os.unlink(log_path)
            raise
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if code != 0:
        tail = Path(log_path).read_text().strip().splitlines()
        raise CannotMeasure(error or f"SGLang child exited {code}: "
                            f"{tail[-1] if tail else '(no output)'} (log: {log_path})")
    os.unlink(log_path)


def _usage(message: str) -> None:
    print(f"bench_sglang_prefetch: {message}", file=sys.stderr)
    sys.exit(ExitCode.USAGE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", default="0.5.20", help="SGLang release (its env must exist)")
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sizes", default="64,256,1024", help="page part sizes in KiB")
    ap.add_argument("--settle-ms", type=float, default=20.0,
                    help="idle before each timed call, the same for SGLang, raw and floor")
    ap.add_argument("--poll-us", type=float, default=200.0,
                    help="the scheduler loop's sleep between passes while waiting")
    ap.add_argument("--json", metavar="PATH", help="also write every figure and round here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return args
    try:
        args.size_list = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        _usage(f"--sizes: want KiB numbers separated by commas, got {args.sizes!r}")
    if min(args.pages, args.rounds, *args.size_list) < 1:
        _usage("--pages, --rounds and --sizes must be positive")
    if any(layers_for(k << 10) < 1 or (k << 10) % layers_for(k << 10) for k in args.size_list) \
            or any(k % 32 for k in args.size_list):
        _usage("--sizes: each page part must be a multiple of 32 KiB (16 tokens x 8 heads x "
               "128 dims x fp16 per layer)")
    if args.settle_ms < 0 or args.poll_us < 0:
        _usage("--settle-ms and --poll-us must not be negative")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.access(folder, os.W_OK) or os.path.isdir(args.json):
            _usage(f"--json: cannot write {args.json}")
    return args


def parent_main(args: argparse.Namespace) -> int:
    from scenarios.nemesis.mooncake_master import (
        MooncakeMaster,
        MooncakeMasterError,
        mooncake_available,
    )

    check_release(args.release)
    ok, why = mooncake_available()
    if not ok:
        raise CannotMeasure(f"mooncake is not available here: {why}")
    load0 = os.getloadavg()
    print(f"sglang {args.release}, one request of {args.pages} pages x 2 parts, best of "
          f"{args.rounds}, {args.settle_ms:g} ms idle before each timed call, scheduler poll "
          f"{args.poll_us:g} us; load average {load0[0]:.2f} on {os.cpu_count()} CPUs\n")
    print("| page part | SGLang GB/s | raw batch_get GB/s | exists + batch_get GB/s "
          "| SGLang / raw | floor / raw | SGLang / floor |")
    print("|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    infos: list[dict] = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items() if k != "child"},
                           "load_before": load0, "load_after": os.getloadavg(),
                           **versions(sglang=args.release), "paths": infos, "rows": rows}, f,
                          indent=1)

    def on_row(row: dict, info: dict) -> None:
        rows.append(row)
        infos.append(info)
        save()
        print(f"| {row['part_kib']} KiB | {row['sglang_gbs']:.2f} | {row['raw_gbs']:.2f} | "
              f"{row['floor_gbs']:.2f} | {row['ratio']:.0%} | {row['floor_ratio']:.0%} | "
              f"{row['sglang_vs_floor']:.0%} |", flush=True)

    try:
        # a long client TTL: on a loaded box a late heartbeat must not drop the segment mid-run
        with MooncakeMaster(client_ttl_s=30) as m, \
                tempfile.TemporaryDirectory(prefix="cpcheck-bench-sgl-") as scratch:
            run_child(args, m.address, scratch, on_row)
    except MooncakeMasterError as e:
        raise CannotMeasure(str(e)) from None
    print_breakdown("SGLang's", rows, list(PHASES))
    if infos:
        i = infos[0]
        print(f"\nSGLang's path: {i['store']}.{i['page_get']} ({i['client']}), host layout "
              f"{i['host_layout']} in {i['host_memory']} memory, {i['keys_per_read']} keys per "
              f"read, per-batch acks "
              f"{i['per_batch_acks']}, hit queue {i['hit_queue']}; key e.g. {i['key_example']}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        save()
        print(f"wrote {args.json}")
    return 0


def main() -> None:
    args = parse_args()
    if args.child:
        sys.exit(child_main(json.loads(args.child)))
    try:
        sys.exit(parent_main(args))
    except CannotMeasure as e:
        print(f"bench_sglang_prefetch: cannot measure here: {e}", file=sys.stderr)
        sys.exit(ExitCode.UNKNOWN)
    except KeyboardInterrupt:
        print("bench_sglang_prefetch: interrupted", file=sys.stderr)
        sys.exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    main()
