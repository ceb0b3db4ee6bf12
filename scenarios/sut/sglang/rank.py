"""One rank of a Schedule on SGLang's own HiRadixCache + HiCacheController (a torchrun job).

Runs inside a pool worker whose PYTHONPATH holds one release's environment (envs.py). The
parallel state is SGLang's own (init_distributed_environment + initialize_model_parallel on
gloo, attention CP), built once per worker; a fresh cache is built per run. The result is a
`scenarios.core.records.RankResult` as `scenarios.sut.reference_rank.execute`'s, so the checker judges it
unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from scenarios.client.loop import run_rank
from scenarios.client.recorder import CollectiveLog
from scenarios.core.errors import CannotJudge, CollectiveError, ErrorKind
from scenarios.core.records import (
    CollectiveCall,
    Decision,
    Outcome,
    RankError,
    RankResult,
    Snapshot,
    StorageCall,
    error_kind,
)
from scenarios.core.timeouts import Timeouts
from scenarios.sut.sglang import (
    adapters,
    call_log,
    consensus,
    mooncake,
    path_trace,
    quick_reset,
    shim,
)
from scenarios.sut.sglang.blame import harness_origin
from scenarios.sut.sglang.seams import GatedDevice, IoGates, SglangPacer

#: failures that say the machine, not SGLang's protocol, broke the run (judged "unknown"):
#: SGLang's host pool refuses to allocate when the RAM is not there (the shim lends back its
#: 10 GiB reserve, so only a really full box), a plain ValueError with this text
HOST_MEMORY_REFUSED = "Not enough host memory available"


#: where a rank stopped because the release lacks a seam the Schedule needs
CANNOT_DRIVE = "driving this SGLang release"


def _machine_broke(e: BaseException) -> str | None:
    """What the harness was doing when the machine, not SGLang, broke the run; else None."""
    if isinstance(e, ValueError) and HOST_MEMORY_REFUSED in str(e):
        return "building SGLang's host pool"
    if isinstance(e, mooncake.ReadBackFailed):
        return "reading the run's pages back from the Mooncake master"
    if isinstance(e, CannotJudge):  # a release the driver cannot drive (MissingSeam)
        return CANNOT_DRIVE
    if error_kind(e) is ErrorKind.FAILED and (at := harness_origin(e)):
        return f"harness error (not SGLang's) raised at {at}"
    return None
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
        self.collectives = CollectiveLog()
        self.run_id = ""
        self.mooncake_master = ""  # "host:port" when the Schedule's backend is mooncake
        self.stored: list[str] | None = None  # read back from the store (Mooncake)
        #: an IO thread that died of an exception the harness's code raised (blame.py)
        self.harness_error: str | None = None
        #: which cache to build: "server" (what the release's server builds) or "HiRadixCache"
        self.cache_class = "server"
        #: which SGLang functions issued collectives, per op (only under path_trace.ENV)
        self.trace = path_trace.PathTrace() if path_trace.folder() else None
        #: the calls as they start, in a file that outlives a rank gloo aborts (call_log.py)
        self.call_log = call_log.CallLog(storage_dir, rank)


CURRENT: Run | None = None
_GROUP_NAMES: dict[int, str] = {}
_HARNESS: set[int] = set()
#: the timeout of every gloo group made in this worker (set once at setup_worker)
_GROUP_TIMEOUT_S = [60.0]


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


def _record_and_call(run: Any, name: str, kind: str, call: CollectiveCall, fn: Any,
                     args: tuple, kwargs: dict) -> Any:
    """The one path every recorded call takes: the stack trace, the per-rank call log (which
    outlives a gloo abort) and the in-memory record, then the call itself."""
    if run.trace is not None:
        run.trace.note(kind)
    run.call_log.write(name, call)
    with run.collectives.call(name, call):
        return fn(*args, **kwargs)


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
            call = CollectiveCall(f"all_reduce {_op_name(op)}", tuple(t.shape),
                                  str(t.dtype).removeprefix("torch."))
        else:
            call = CollectiveCall(kind)
        return _record_and_call(run, name, kind, call, fn, args, kwargs)
    wrapper._cpcheck = True  # type: ignore[attr-defined]
    return wrapper


def _pp_forward_call(kind: str, args: tuple, kwargs: dict, group: Any) -> Any:
    """A point-to-point call on the PP group as one "forward" from its sender, or None when it
    is not logged. 0.5.13's `_pp_sync` has stage 0 `isend` its agreed value and every later
    stage `recv` it from the one before (and pass it on): the first stage's send and each
    receive are logged, so stage 0 and stage 1 compare call for call, as the reference's
    forward does (a middle stage's pass-on is not a call of its own there)."""
    ranks = dist.get_process_group_ranks(group)
    me = dist.get_rank()
    t = args[0] if args else kwargs["tensor"]
    if kind == "recv":
        src = kwargs.get("src")
        if src is None and kwargs.get("group_src") is not None:
            src = ranks[kwargs["group_src"]]
        if src is None and len(args) > 1:
            src = args[1]
        src = ranks[0] if src is None else src
    elif ranks.index(me) == 0:
        src = me
    else:
        return None
    return CollectiveCall("forward", tuple(t.shape), str(t.dtype).removeprefix("torch."), src)


def _recorded_p2p(kind: str, fn: Any) -> Any:
    """send / isend / recv: on the PP group a forward (_pp_forward_call), elsewhere by kind."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run = CURRENT
        group = kwargs.get("group")
        if group is None and len(args) > 2:
            group = args[2]
        name = _group_name(group) if run is not None else None
        if name is None:
            return fn(*args, **kwargs)
        if name.startswith("pp["):
            call = _pp_forward_call(kind, args, kwargs, group)
            if call is None:
                return fn(*args, **kwargs)
        else:
            call = CollectiveCall(kind)
        return _record_and_call(run, name, kind, call, fn, args, kwargs)
    wrapper._cpcheck = True  # type: ignore[attr-defined]
    return wrapper


def _install_recorders() -> None:
    for kind in ("all_reduce", "barrier", "all_gather_object", "broadcast", "all_gather",
                 "send", "isend", "recv"):
        fn = getattr(dist, kind)
        if not getattr(fn, "_cpcheck", False):
            wrap = _recorded_p2p if kind in ("send", "isend", "recv") else _recorded
            setattr(dist, kind, wrap(kind, fn))
    new_group = dist.new_group
    if not getattr(new_group, "_cpcheck", False):
        counter = [0]

        def named_new_group(*args: Any, **kwargs: Any) -> Any:
            # SGLang's gloo groups wait 120 min (torch's default 30): a rank that SGLang leaves
            # alone in a collective (0.5.13's writing_check early return under a host_alloc
            # fault) must raise within the run's budget, so the checker sees the lone call and
            # who waited on it, not a job timeout. Only how long a hang lasts changes.
            ours = timedelta(seconds=_GROUP_TIMEOUT_S[0])
            if len(args) >= 2:
                args = (args[0], min(args[1] or ours, ours), *args[2:])
            else:
                kwargs["timeout"] = min(kwargs.get("timeout") or ours, ours)
            g = new_group(*args, **kwargs)
            ranks = kwargs.get("ranks", args[0] if args else None)
            counter[0] += 1
            if g is not None and not isinstance(g, int):
                # overwrite: SGLang destroys the per-cache prefetch group at detach, and a new
                # group may get a freed one's id on one rank only; a stale name there made the
                # same group two names across ranks (a flaky [collectives] divergence)
                _GROUP_NAMES[id(g)] = f"g{counter[0]}_{list(ranks or [])}"
            return g
        named_new_group._cpcheck = True  # type: ignore[attr-defined]
        dist.new_group = named_new_group


# -- per pool: SGLang's imports, once, in the zygote the ranks are forked from ----------------

#: what a rank imports before and during its first run (setup_worker, Driver, the adapters),
#: each optional: a release that lacks one (hiradix_cache from 0.5.21, unified_radix_cache
#: before 0.5.11) is set up without it as before. Mooncake's store is left to the ranks.
PRELOADED = ("sglang.srt.managers.cache_controller", "sglang.srt.distributed.parallel_state",
             "sglang.srt.mem_cache.hiradix_cache", "sglang.srt.mem_cache.unified_radix_cache",
             "sglang.srt.mem_cache.memory_pool", "sglang.srt.mem_cache.allocator",
             "sglang.srt.mem_cache.cache_init_params", "sglang.srt.mem_cache.storage",
             "sglang.srt.server_args", "sglang.srt.layers.dp_attention",
             "scenarios.sut.sglang.storage")


def preload() -> None:
    """The pool's zygote calls this once (scenarios/runner/zygote.py): every rank forked from
    it starts with SGLang imported (~5 s and ~500 MB per rank otherwise). Imports only: no
    thread, group or pool may exist when the zygote forks."""
    import importlib

    shim.install()
    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise  # a dependency missing, not the module this release lacks


# -- per worker: SGLang's parallel state, once ----------------------------------------------

def setup_worker(ctx: Any, version: str, dp_attention: bool, timeout_s: float) -> dict:
    st = ctx.state.get("sglang")
    if st is not None:
        return st
    shim.install()
    import sglang.srt.managers.cache_controller as cc_mod
    from sglang.srt.distributed import parallel_state as ps

    try:  # the classes a HiCache server builds (server_cache.py), loaded before the shim's patch
        import sglang.srt.mem_cache.hiradix_cache  # noqa: F401
    except ModuleNotFoundError:  # 0.5.21+
        pass
    try:
        import sglang.srt.mem_cache.unified_radix_cache  # noqa: F401
    except ModuleNotFoundError:  # before 0.5.11
        pass

    shim.patch_loaded()
    quick_reset.install(cc_mod)  # no idle 1 s per cache construction (see quick_reset.py)
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
    _GROUP_TIMEOUT_S[0] = Timeouts(timeout_s).sglang_group_s
    _install_recorders()

    def thread_died(args: Any) -> None:
        if args.exc_type is SystemExit:  # SGLang's consensus checker fired (consensus.py)
            return
        run = CURRENT
        line = f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: " \
               f"{args.exc_value}"
        if run is not None:
            run.gates.thread_errors.append(line)
            at = harness_origin(args.exc_value) if args.exc_value is not None else None
            if at is not None and run.harness_error is None:
                run.harness_error = (f"harness error (not SGLang's) in thread {line}, "
                                     f"raised at {at}")
            with run.gates.cond:
                run.gates.cond.notify_all()
    threading.excepthook = thread_died
    lay = ctx.layout
    # one path on every rank, as a server's ranks share their model path: SGLang names storage
    # keys after it from 0.5.17 (Mooncake's config prefix holds the model name)
    model_dir = os.path.join(tempfile.gettempdir(), f"cpcheck-sgl-model-{os.getuid()}")
    os.makedirs(model_dir, exist_ok=True)
    part = os.path.join(model_dir, f".config.{ctx.rank}.json")
    with open(part, "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": HEADS * HEAD_DIM, "num_attention_heads": HEADS,
                   "num_key_value_heads": HEADS, "num_hidden_layers": LAYERS,
                   "intermediate_size": 16, "vocab_size": 2_000_000,
                   "max_position_embeddings": 4096, "torch_dtype": "float32"}, f)
    os.replace(part, os.path.join(model_dir, "config.json"))  # the same bytes from every rank
    adapters.publish_topology(model_dir, rank=ctx.rank, tp=lay.tp * lay.cp, cp=lay.cp,
                              pp=lay.pp, dp_attention=dp_attention)
    ps.init_distributed_environment(world_size=ctx.world_size, rank=ctx.rank,
                                    local_rank=ctx.rank, backend="gloo",
                                    distributed_init_method="env://")
    adapters.call_filtered(ps.initialize_model_parallel,
                           tensor_model_parallel_size=lay.tp * lay.cp,
                           attention_context_model_parallel_size=lay.cp,
                           pipeline_model_parallel_size=lay.pp, backend="gloo")
    tp = ps.get_tp_group()
    attn_tp, attn_cp, pp = ps.get_attn_tp_group(), ps.get_attn_cp_group(), ps.get_pp_group()
    for tag, coord in (("tp", tp), ("attn_tp", attn_tp), ("attn_cp", attn_cp), ("pp", pp)):
        for g in (coord.cpu_group, coord.device_group):
            _GROUP_NAMES[id(g)] = f"{tag}{list(dist.get_process_group_ranks(g))}"
    harness = dist.new_group(list(range(ctx.world_size)), backend="gloo")
    _HARNESS.add(id(harness))
    st = ctx.state["sglang"] = {
        "cc_mod": cc_mod, "tp": tp, "attn_tp": attn_tp, "attn_cp": attn_cp, "pp": pp,
        "harness": harness, "model_dir": model_dir, "version": version,
        # where `sglang` was imported from: a source tree's runs prove they ran the tree
        "sglang_package": os.path.dirname(os.path.abspath(sys.modules["sglang"].__file__)),
    }
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    StorageBackendFactory.register_backend(BACKEND_NAME, "scenarios.sut.sglang.storage", "GatedStorage")  # noqa: E501
    StorageBackendFactory.register_backend("mooncake", "scenarios.sut.sglang.mooncake_store",
                                           "GatedMooncakeStore")
    return st


def _any_rank(st: dict, flag: int) -> int:
    t = torch.tensor([flag], dtype=torch.int64)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=st["harness"])
    except RuntimeError as e:  # a peer that never came to the harness's barrier: type it
        if type(e) is RuntimeError:
            raise CollectiveError(f"harness all_reduce MAX: {e}") from e
        raise
    return int(t.item())


# -- the run --------------------------------------------------------------------------------

class SglangRank:
    """One SGLang release's cache as a `SutRank` (scenarios/client/loop.py)."""

    def __init__(self, s: Any, st: dict, run: Run, dev: GatedDevice, dp_attention: bool,
                 mooncake_metrics: str = "") -> None:
        self.s, self.st, self.run, self.dev, self.dp = s, st, run, dev, dp_attention
        self.mooncake_metrics = mooncake_metrics
        self.driver: Any = None
        self.build_s = 0.0
        self.shutdown_s = 0.0

    def open(self) -> None:
        t0 = time.monotonic()
        self.driver = Driver(self.s, self.st, self.run, self.dev, self.dp)
        self.build_s = time.monotonic() - t0  # where a run's time goes (bench_sglang.py)

    def apply(self, op: Any) -> None:
        if self.run.trace is not None:
            self.run.trace.op = op.kind
        self.driver.apply(op)

    def step(self) -> None:
        self.driver.step()

    def residency(self) -> tuple[str, ...] | None:
        return self.driver.residency()

    def busy(self) -> bool:
        return bool(self.driver is not None and self.driver.busy())

    def draining(self) -> None:
        self.run.pacer.drain = True
        if self.run.trace is not None:
            self.run.trace.op = path_trace.DRAIN

    def finish(self) -> Snapshot:
        run = self.run
        snapshot = self.driver.snapshot()
        if run.mooncake_master:  # before any rank cleans up: clients own their objects
            run.stored = mooncake.read_back(run)
            snapshot["mooncake_client"] = mooncake.client_info(run)
            if run.rank == 0 and self.mooncake_metrics:  # all of the run's keys
                snapshot["mooncake_master_keys"] = mooncake.master_keys(
                    self.mooncake_metrics, mooncake.run_tag(run) + "_")
        return Snapshot.of(snapshot)

    def sync(self, flag: int) -> int:
        return _any_rank(self.st, flag)

    def machine_broke(self, e: BaseException) -> str | None:
        # SGLang's host pool refusing to allocate is a plain ValueError, recognised here once
        return _machine_broke(e)

    def unblock(self) -> None:
        self.run.gates.release_all()

    def close(self) -> None:
        t0 = time.monotonic()
        if self.driver is not None:
            try:
                self.driver.shutdown()
            except Exception:
                pass
        self.shutdown_s = time.monotonic() - t0
        if self.run.mooncake_master:
            mooncake.end_run(self.run)


def _checker_groups(st: dict) -> list:
    """The groups SGLang's Scheduler gives its consensus checker (init_rank_consensus_checker):
    attention CP and attention TP, else TP (PP is 1 here)."""
    if st.get("attn_cp") is not None and st.get("attn_tp") is not None:
        return [st["attn_cp"], st["attn_tp"]]
    return [st["tp"]]


def _scheduler_decisions(held: dict) -> int:
    sut = held.get("sut")
    return len(sut.driver.decisions["scheduler"]) if sut is not None and sut.driver else 0


def run_schedule(ctx: Any, payload: dict) -> RankResult:
    """Pool job: execute one Schedule on this rank against SGLang's cache."""
    global CURRENT
    from scenarios.core.schedule import Schedule

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
    held: dict[str, Any] = {}  # SGLang's own rank-consensus checker, when asked for
    checker = consensus.load() if payload.get("consensus_checker") else None
    if checker is not None:  # before CURRENT: its group set-up is not the cache's collective
        consensus.start(checker, _checker_groups(st), lambda: _scheduler_decisions(held),
                        _HARNESS)
    run = CURRENT = Run(rank, pacer, gates, storage_dir)
    run.run_id = payload["run_id"]
    run.mooncake_master = payload.get("mooncake_master", "")
    run.cache_class = payload.get("cache_class", "server")
    sut = SglangRank(s, st, run, dev, payload["dp_attention"],
                     payload.get("mooncake_metrics") or "")
    held["sut"] = sut
    try:
        out = run_rank(sut, s.ops, gated=True)
    finally:
        CURRENT = None
        run.call_log.close()
        if run.trace is not None and path_trace.folder():
            run.trace.write(os.path.join(path_trace.folder() or "", f"{run.run_id}-r{rank}.json"))
        if checker is not None:
            said = consensus.finish(checker)
            d = sut.driver
            t0 = said.pop("t0")
            said["decided_s"] = [round(x - t0, 4) for x in (d.decided_at if d else [])]
            held["said"] = said
    if run.harness_error is not None and (out.error is None or out.error.kind is not
                                          ErrorKind.INFRASTRUCTURE):
        # an IO thread of SGLang's died in the harness's code: whatever the run did after that
        # (a gate timeout, a divergence) is no verdict on the release
        out.error = RankError(ErrorKind.INFRASTRUCTURE, "HarnessError", run.harness_error,
                              "an SGLang IO thread", out.error.traceback if out.error else "")
    driver = sut.driver
    return RankResult(
        rank=rank, coords=tuple(ctx.layout.coords(rank)),
        decisions={ch: tuple(map(Decision.of, v))
                   for ch, v in (driver.decisions if driver else {}).items()},
        evictions=tuple(out.evictions),
        digests=tuple(driver.digests if driver else ()),
        collectives=run.collectives.call_records(),
        collective_order=run.collectives.order_records(),
        pending_collectives=run.collectives.pending_text(),
        storage=tuple(StorageCall(op, tuple(k), tuple(ok), tuple(c)) for op, k, ok, c in run.storage),
        stored=tuple(run.stored) if run.stored is not None else
        tuple(sorted({k for op, keys, ok, _ in run.storage if op == "set"
                      for k, good in zip(keys, ok, strict=False) if good})),
        outcomes=tuple(map(Outcome.of, driver.outcomes if driver else ())),
        snapshot=out.snapshot, error=out.error, ops_done=out.ops_done,
        waiting_on=dict(gates.waiting_on), wall_s=time.monotonic() - t0,
        sglang_package=st.get("sglang_package") or "", consensus_checker=held.get("said"),
        sut=payload.get("sut") or f"sglang=={st['version']}", pacer_trace=tuple(pacer.trace),
        phase_s={"build": sut.build_s, "shutdown": sut.shutdown_s},
    )


from scenarios.sut.sglang.driver import Driver  # noqa: E402  (needs the names above)
