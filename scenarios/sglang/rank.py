"""One rank of a Schedule on SGLang's own HiRadixCache + HiCacheController (a torchrun job).

Runs inside a pool worker whose PYTHONPATH holds one release's environment (envs.py). The
parallel state is SGLang's own (init_distributed_environment + initialize_model_parallel on
gloo, attention CP), built once per worker; a fresh cache is built per run. The result has the
shape of `scenarios.rank_run.execute`'s, so `scenarios.checker.check` judges it unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from scenarios.sglang import adapters, shim
from scenarios.sglang.seams import GatedDevice, IoGates, SglangPacer

MAX_DRAIN_STEPS = 200
#: SGLang builds a registered backend only under a built-in name: ours replaces "file"
BACKEND_NAME = "file"
HEADS, HEAD_DIM, LAYERS = 2, 4, 2


class Run:
    """What the storage backend and the collective recorder of the current run write into."""

    def __init__(self, rank: int, pacer: SglangPacer, gates: IoGates, storage_dir: str) -> None:
        self.rank = rank
        self.pacer = pacer
        self.gates = gates
        self.storage_dir = storage_dir
        self.storage: list[list] = []
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.key_tp = 0
        self.log: dict[str, list[str]] = defaultdict(list)
        self.order: dict[str, list[int]] = defaultdict(list)
        self.pending: dict[str, str] = {}
        self.count = 0


CURRENT: Run | None = None
_GROUP_NAMES: dict[int, str] = {}
_HARNESS: set[int] = set()


# -- collectives: recorded on the way through, never changed --------------------------------

def _op_name(op: Any) -> str:
    for name in ("MIN", "MAX", "SUM", "PRODUCT", "AVG"):
        if op == getattr(dist.ReduceOp, name, object()):
            return name
    return str(op)


def _group_name(group: Any) -> str | None:
    if group is None or group is dist.group.WORLD:
        return f"world{list(range(dist.get_world_size()))}"
    if id(group) in _HARNESS:
        return None
    name = _GROUP_NAMES.get(id(group))
    if name is None:
        name = f"g{list(dist.get_process_group_ranks(group))}"
    return name


def _recorded(kind: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run = CURRENT
        group = kwargs.get("group")
        if group is None and kind == "all_reduce" and len(args) > 2:
            group = args[2]
        name = _group_name(group) if run is not None else None
        if name is None:
            return fn(*args, **kwargs)
        if kind == "all_reduce":
            t = args[0] if args else kwargs["tensor"]
            op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
            entry = f"all_reduce {_op_name(op)} {list(t.shape)} " \
                    f"{str(t.dtype).removeprefix('torch.')}"
        else:
            entry = kind
        thread = threading.current_thread().name
        with run.lock:
            run.log[name].append(entry)
            run.order[name].append(run.count)
            run.count += 1
            run.pending[thread] = f"{entry} over {name}"
        try:
            return fn(*args, **kwargs)
        finally:
            with run.lock:
                run.pending.pop(thread, None)
    wrapper._cpcheck = True  # type: ignore[attr-defined]
    return wrapper


def _install_recorders() -> None:
    for kind in ("all_reduce", "barrier", "all_gather_object", "broadcast", "all_gather",
                 "send", "recv"):
        fn = getattr(dist, kind)
        if not getattr(fn, "_cpcheck", False):
            setattr(dist, kind, _recorded(kind, fn))
    new_group = dist.new_group
    if not getattr(new_group, "_cpcheck", False):
        counter = [0]

        def named_new_group(*args: Any, **kwargs: Any) -> Any:
            g = new_group(*args, **kwargs)
            ranks = kwargs.get("ranks", args[0] if args else None)
            counter[0] += 1
            if g is not None and not isinstance(g, int):
                # overwrite: a new group may reuse the id of a collected one (a previous
                # run's controller groups), whose name would then differ across ranks
                _GROUP_NAMES[id(g)] = f"g{counter[0]}_{list(ranks or [])}"
            return g
        named_new_group._cpcheck = True  # type: ignore[attr-defined]
        dist.new_group = named_new_group


# -- per worker: SGLang's parallel state, once ----------------------------------------------

def setup_worker(ctx: Any, version: str, dp_attention: bool, timeout_s: float) -> dict:
    st = ctx.state.get("sglang")
    if st is not None:
        return st
    shim.install()
    import sglang.srt.managers.cache_controller as cc_mod
    import sglang.srt.mem_cache.hiradix_cache  # noqa: F401
    from sglang.srt.distributed import parallel_state as ps

    shim.patch_loaded()
    # from 0.5.15 page hashes come from a C++ extension JIT-compiled on first use (minutes on a
    # busy box, one compile shared through ~/.cache/torch_extensions): do it now, not in a run
    try:
        from sglang.srt.mem_cache.utils import get_hash_str
    except ImportError:
        from sglang.srt.mem_cache.hicache_storage import get_hash_str
    get_hash_str([1, 2, 3, 4], None)
    for g in (ctx.groups.attn_tp_group, ctx.groups.attn_cp_group, ctx.groups.tp_group,
              ctx.groups.pp_group):
        _HARNESS.add(id(g))
    _install_recorders()

    def thread_died(args: Any) -> None:
        run = CURRENT
        line = f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: " \
               f"{args.exc_value}"
        if run is not None:
            run.gates.thread_errors.append(line)
            with run.gates.cond:
                run.gates.cond.notify_all()
    threading.excepthook = thread_died
    lay = ctx.layout
    ps.init_distributed_environment(world_size=ctx.world_size, rank=ctx.rank,
                                    local_rank=ctx.rank, backend="gloo",
                                    distributed_init_method="env://")
    adapters.call_filtered(ps.initialize_model_parallel,
                           tensor_model_parallel_size=lay.tp * lay.cp,
                           attention_context_model_parallel_size=lay.cp, backend="gloo")
    tp = ps.get_tp_group()
    attn_tp, attn_cp = ps.get_attn_tp_group(), ps.get_attn_cp_group()
    for tag, coord in (("tp", tp), ("attn_tp", attn_tp), ("attn_cp", attn_cp)):
        for g in (coord.cpu_group, coord.device_group):
            _GROUP_NAMES[id(g)] = f"{tag}{list(dist.get_process_group_ranks(g))}"
    harness = dist.new_group(list(range(ctx.world_size)), backend="gloo")
    _HARNESS.add(id(harness))
    model_dir = tempfile.mkdtemp(prefix="cpcheck-sgl-model-")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": HEADS * HEAD_DIM, "num_attention_heads": HEADS,
                   "num_key_value_heads": HEADS, "num_hidden_layers": LAYERS,
                   "intermediate_size": 16, "vocab_size": 2_000_000,
                   "max_position_embeddings": 4096, "torch_dtype": "float32"}, f)
    st = ctx.state["sglang"] = {
        "cc_mod": cc_mod, "tp": tp, "attn_tp": attn_tp, "attn_cp": attn_cp,
        "harness": harness, "model_dir": model_dir, "version": version,
    }
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    StorageBackendFactory.register_backend(BACKEND_NAME, "scenarios.sglang.storage", "GatedStorage")  # noqa: E501
    return st


def _any_rank(st: dict, flag: int) -> int:
    t = torch.tensor([flag], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=st["harness"])
    return int(t.item())


# -- the run --------------------------------------------------------------------------------

def run_schedule(ctx: Any, payload: dict) -> dict:
    """Pool job: execute one Schedule on this rank against SGLang's cache."""
    global CURRENT
    from scenarios.schedule import Schedule

    s = Schedule.model_validate_json(payload["schedule"])
    timeout = float(payload["collective_timeout_s"])
    st = setup_worker(ctx, payload["version"], payload["dp_attention"], timeout)
    t0 = time.monotonic()
    rank = ctx.rank
    dev = GatedDevice()
    gates = IoGates(rank, timeout)
    pacer = SglangPacer(rank, s.choices.get(rank, []), s.faults.get(rank, []),
                        s.clock_skew.get(rank, 0), dev, gates)
    storage_dir = os.path.join(payload["storage_root"], payload["run_id"])
    os.makedirs(storage_dir, exist_ok=True)
    run = CURRENT = Run(rank, pacer, gates, storage_dir)
    driver = None
    error = None
    snapshot: dict = {}
    ops_done = 0
    try:
        driver = Driver(s, st, run, dev, payload["dp_attention"])
        for op in s.ops:
            driver.apply(op)
            ops_done += 1
            _any_rank(st, 0)
        pacer.drain = True
        for _ in range(MAX_DRAIN_STEPS):
            driver.step()
            if not _any_rank(st, int(driver.busy())):
                break
        snapshot = driver.snapshot()
        _any_rank(st, 0)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        snapshot = {"traceback": traceback.format_exc(limit=8)}
    finally:
        gates.release_all()
        if driver is not None:
            driver.shutdown()
        CURRENT = None
    coords = list(ctx.layout.coords(rank))
    return {
        "rank": rank, "coords": coords,
        "decisions": dict(driver.decisions) if driver else {},
        "digests": driver.digests if driver else [],
        "collectives": dict(run.log), "collective_order": dict(run.order),
        "pending_collectives": dict(run.pending), "storage": run.storage,
        "stored": sorted({k for op, keys, ok, _ in run.storage if op == "set"
                          for k, good in zip(keys, ok, strict=False) if good}),
        "outcomes": driver.outcomes if driver else [], "snapshot": snapshot, "error": error,
        "ops_done": ops_done, "waiting_on": dict(gates.waiting_on),
        "wall_s": time.monotonic() - t0, "sut": f"sglang=={st['version']}",
        "pacer_trace": pacer.trace,
    }


from scenarios.sglang.driver import Driver  # noqa: E402  (needs the names above)
