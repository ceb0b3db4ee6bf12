"""The client: execute one Schedule on one rank and return everything the checker compares.

Used unchanged by the in-process runner (ranks as threads) and by torchrun workers, so both
modes run the same code and their decision logs can be compared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reference.api import (
    CacheConfig,
    HiCacheStorage,
    KVShape,
    ParallelGroups,
    RankInfo,
    StorageAccess,
    effective_configuration,
    open_rank,
)
from scenarios.client.gates import GatedPacer, RecordingPacer
from scenarios.client.recorder import Recorder, RecordingCollectives
from scenarios.core.records import (
    ErrorKind,
    Eviction,
    Outcome,
    RankError,
    RankResult,
    Recorded,
)
from scenarios.core.schedule import Schedule

MAX_DRAIN_STEPS = 400


@dataclass
class RunEnv:
    """Where and how this rank runs (not part of the Schedule: the same Schedule runs anywhere)."""

    rank: int
    run_id: str
    device: str = "cpu"
    storage_root: str = ""  # file backend: a directory every rank of the run shares
    mooncake_master: str = ""  # mooncake backend: "host:port"
    gated: bool = True
    agree_timeout_s: float = 20.0


def make_storage(backend: str, env: RunEnv) -> HiCacheStorage:
    if backend == "memory":
        from reference.api import MemoryStorage

        return MemoryStorage(namespace=env.run_id)
    if backend == "file":
        from reference.api import FileStorage

        return FileStorage(Path(env.storage_root) / env.run_id)
    if backend == "mooncake":
        from scenarios.client.storage_clients import lease

        # one client per rank for the life of the process; the run only borrows it
        return lease(env.mooncake_master, env.rank, env.run_id)
    raise ValueError(f"unknown backend '{backend}'")


def cache_config(s: Schedule, env: RunEnv) -> CacheConfig:
    c = s.cache
    return CacheConfig(
        page_size=c.page_size, device_pages=c.device_pages, host_pages=c.host_pages,
        kv=KVShape(is_mla=c.mla, heads=1 if c.mla else 2),
        write_policy=c.write_policy, prefetch_threshold=c.prefetch_threshold,
        prefetch_batch_pages=c.prefetch_batch_pages,
        prefetch_stop_policy=c.prefetch_stop_policy,
        prefetch_timeout_s=float(c.prefetch_timeout_ticks) * (1.0 if env.gated else 0.05),
        variant=s.variant, key_prefix=f"{env.run_id}_", agree_timeout_s=env.agree_timeout_s,
        protocol=s.protocol, enable_dp_attention=s.dp_attention,
    )


def rank_groups(s: Schedule, rank: int) -> tuple[RankInfo, ParallelGroups]:
    lay = s.layout_obj
    tp, cp, pp = lay.coords(rank)
    info = RankInfo(tp_rank=tp, tp_size=lay.tp, cp_rank=cp, cp_size=lay.cp, pp_rank=pp,
                    pp_size=lay.pp)
    attn_tp = lay.attn_tp_group(rank)
    _, dp_attention = effective_configuration(s.protocol, s.dp_attention, s.variant)
    # SGLang's tp_cache_group: attn_tp_cpu_group with DP attention, else the stage's tp_cpu_group
    tp_cache_group = attn_tp if dp_attention else lay.tp_group(rank)
    groups = ParallelGroups(tp=tp_cache_group, attn_tp=attn_tp, attn_cp=lay.attn_cp_group(rank),
                            pp=lay.pp_group(rank) if lay.pp > 1 else None)
    return info, groups


def execute(s: Schedule, env: RunEnv, collectives: Any, nemesis: Any = None) -> RankResult:
    """Run `s` on this rank. Never raises for a run failure: the error is part of the result."""
    t0 = time.monotonic()
    info, groups = rank_groups(s, env.rank)
    rec = Recorder()
    coll = RecordingCollectives(collectives)
    if env.gated:
        pacer: Any = GatedPacer(env.rank, s.choices.get(env.rank, []),
                                s.faults.get(env.rank, []), s.clock_skew.get(env.rank, 0),
                                wait_timeout_s=env.agree_timeout_s)
    else:
        pacer = RecordingPacer(env.rank, nemesis, wait_timeout_s=env.agree_timeout_s)
    storage = None
    stored: list[str] = []
    sched = None
    error: RankError | None = None
    snapshot: dict = {}
    ops_done = 0
    evictions: list[Eviction] = []
    try:
        try:
            storage = make_storage(s.backend, env)
        except Exception as e:  # outside the system under test: a verdict of `unknown`
            error = RankError.of(e, ErrorKind.INFRASTRUCTURE,
                                 f"storage backend '{s.backend}' unavailable")
            raise
        sched = open_rank(cache_config(s, env), info, groups, coll, storage,
                          torch.device(env.device), pacer, rec)
        harness_sync = coll.new_groups([tuple(range(s.layout_obj.world_size))], "harness")[0]

        def any_rank(flag: int) -> int:
            """MAX over every rank: the harness's own barrier and agreement."""
            t = torch.tensor([flag], dtype=torch.int64)
            coll.all_reduce(t, "max", harness_sync)
            return int(t.item())

        for op in s.ops:
            if op.kind.startswith("evict"):  # for coverage: eviction with IO in flight
                evictions.append(Eviction(op.kind, bool(sched.busy())))
            _apply(sched, op)
            ops_done += 1
            # the model's forward pass keeps ranks in lockstep per scheduler step in production
            # (its TP/CP collectives); without this a variant that drops the cache's own syncs
            # would let one rank race ahead and make shared-storage runs timing-dependent
            any_rank(0)
        pacer.drain = True
        # gated: MAX_DRAIN_STEPS steps, as the Schedule fixes; free-running: also until the
        # agreement timeout, since real IO (a backup across a Mooncake master restart) may
        # outlast 400 short steps. "Go on" is a MAX over ranks, so every rank leaves together.
        deadline = time.monotonic() + env.agree_timeout_s
        step = 0
        while True:
            sched.step()
            over = step >= MAX_DRAIN_STEPS - 1 and (env.gated or time.monotonic() > deadline)
            if not any_rank(int(sched.busy() and not over)):
                break
            step += 1
            if not env.gated:
                time.sleep(0.002)
        snapshot = sched.snapshot()
        stored = _confirm_stored(storage, rec.storage)
        # clients own their objects (Mooncake drops them on close): nobody closes until all
        # ranks have looked
        any_rank(0)
    except Exception as e:  # the result carries it; the checker turns it into a verdict
        if error is None:
            error = RankError.of(e)  # its kind from the exception's type (scenarios/core/records.py)
        snapshot = {"traceback": error.traceback}
    finally:
        if sched is not None:
            try:
                sched.shutdown()
            except Exception:
                pass
        if storage is not None:
            try:
                storage.close()
            except Exception:
                pass
    recorded = None
    if isinstance(pacer, RecordingPacer):
        recorded = Recorded(tuple(pacer.choices), tuple((c, int(n)) for c, n in pacer.faults))
    return RankResult(
        rank=env.rank,
        coords=tuple(s.layout_obj.coords(env.rank)),
        decisions=rec.decision_records(),
        effects=rec.effect_records(),
        actions=rec.action_records(),
        evictions=tuple(evictions),
        digests=tuple(rec.digests),
        collectives=coll.call_records(),
        collective_order=coll.order_records(),
        pending_collectives=coll.pending_text(),
        storage=rec.storage_records(),
        stored=tuple(stored),
        outcomes=tuple(map(Outcome.of, sched.outcomes if sched else ())),
        snapshot=snapshot,
        error=error,
        ops_done=ops_done,
        waiting_on=dict(pacer.waiting_on),
        wall_s=time.monotonic() - t0,
        recorded=recorded,
    )


def _confirm_stored(storage: HiCacheStorage, accesses: list[StorageAccess],
                    limit: int = 512) -> list[str]:
    """The keys this rank wrote that the store still holds at the end of the run."""
    written = sorted({k for a in accesses if a.op == "set"
                      for k, good in zip(a.keys, a.ok, strict=False) if good})[:limit]
    return [k for k in written if storage.exists(k)]


def _apply(sched: Any, op: Any) -> None:
    if op.kind == "add":
        sched.add_request(op.rid, op.tokens, storage_prefetch=op.prefetch)
    elif op.kind == "step":
        sched.step()
    elif op.kind == "abort":
        sched.abort(op.rid)
    elif op.kind == "evict_device":
        sched.evict_device(op.n)
    elif op.kind == "evict_host":
        sched.evict_host(op.n)
