"""The reference as a system under test: one rank of a Schedule on our own HiCache.

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
from scenarios.client.loop import run_rank
from scenarios.client.recorder import Recorder, RecordingCollectives
from scenarios.client.residency import page_residency
from scenarios.core.records import (
    Outcome,
    RankResult,
    Recorded,
    Snapshot,
)
from scenarios.core.schedule import Schedule


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


class ReferenceRank:
    """The reference as a `SutRank` (scenarios/client/loop.py): one rank's MiniScheduler."""

    def __init__(self, s: Schedule, env: RunEnv, collectives: Any, pacer: Any) -> None:
        self.s = s
        self.env = env
        self.rec = Recorder()
        self.coll = RecordingCollectives(collectives)
        self.pacer = pacer
        self.storage: HiCacheStorage | None = None
        self.sched: Any = None
        self.stored: list[str] = []
        self._harness: Any = None
        self._opening_storage = False

    def open(self) -> None:
        # the harness's group first: a rank whose storage never comes up can still tell its peers
        world = tuple(range(self.s.layout_obj.world_size))
        self._harness = self.coll.new_groups([world], "harness")[0]
        self._opening_storage = True
        self.storage = make_storage(self.s.backend, self.env)
        self._opening_storage = False
        info, groups = rank_groups(self.s, self.env.rank)
        self.sched = open_rank(cache_config(self.s, self.env), info, groups, self.coll,
                               self.storage, torch.device(self.env.device), self.pacer,
                               self.rec)

    def apply(self, op: Any) -> None:
        _apply(self.sched, op)

    def step(self) -> None:
        self.sched.step()

    def residency(self) -> tuple[str, ...]:
        """The pages on device and host after an evict op (differential mode compares them)."""
        rows, stack = [], [(self.sched.cache.tree.root, ())]
        while stack:
            n, prefix = stack.pop()
            for child in n.children.values():
                path = prefix + tuple(child.key)
                rows.append((path, len(child.key), not child.evicted, child.backuped))
                stack.append((child, path))
        return page_residency(rows, self.s.cache.page_size)

    def busy(self) -> bool:
        return bool(self.sched is not None and self.sched.busy())

    def draining(self) -> None:
        self.pacer.drain = True

    def finish(self) -> Snapshot:
        snapshot = Snapshot.of(self.sched.snapshot())
        self.stored = _confirm_stored(self.storage, self.rec.storage)
        return snapshot

    def sync(self, flag: int) -> int:
        if self._harness is None:  # failed before the harness group existed: nobody to tell
            return flag
        t = torch.tensor([flag], dtype=torch.int64)
        self.coll.all_reduce(t, "max", self._harness)
        return int(t.item())

    def machine_broke(self, e: BaseException) -> str | None:
        # outside the system under test: a verdict of `unknown`
        return f"storage backend '{self.s.backend}' unavailable" if self._opening_storage \
            else None

    def unblock(self) -> None:
        """Gated IO waits time out on their own (GatedPacer's wait timeout)."""

    def close(self) -> None:
        for closer in (getattr(self.sched, "shutdown", None),
                       getattr(self.storage, "close", None)):
            if closer is not None:
                try:
                    closer()
                except Exception:
                    pass


def execute(s: Schedule, env: RunEnv, collectives: Any, nemesis: Any = None) -> RankResult:
    """Run `s` on this rank. Never raises for a run failure: the error is part of the result."""
    t0 = time.monotonic()
    if env.gated:
        pacer: Any = GatedPacer(env.rank, s.choices.get(env.rank, []),
                                s.faults.get(env.rank, []), s.clock_skew.get(env.rank, 0),
                                wait_timeout_s=env.agree_timeout_s, nemesis=nemesis)
    else:
        pacer = RecordingPacer(env.rank, nemesis, wait_timeout_s=env.agree_timeout_s)
    sut = ReferenceRank(s, env, collectives, pacer)
    run = run_rank(sut, s.ops, gated=env.gated, free_run_s=env.agree_timeout_s)
    rec, coll, sched = sut.rec, sut.coll, sut.sched
    recorded = None
    if isinstance(pacer, RecordingPacer):
        recorded = Recorded(tuple(pacer.choices), tuple((c, int(n)) for c, n in pacer.faults))
    return RankResult(
        rank=env.rank,
        coords=tuple(s.layout_obj.coords(env.rank)),
        decisions=rec.decision_records(),
        effects=rec.effect_records(),
        actions=rec.action_records(),
        evictions=tuple(run.evictions),
        digests=tuple(rec.digests),
        collectives=coll.call_records(),
        collective_order=coll.order_records(),
        pending_collectives=coll.pending_text(),
        storage=rec.storage_records(),
        stored=tuple(sut.stored),
        outcomes=tuple(map(Outcome.of, sched.outcomes if sched else ())),
        snapshot=run.snapshot,
        error=run.error,
        ops_done=run.ops_done,
        waiting_on=dict(pacer.waiting_on),
        wall_s=time.monotonic() - t0,
        recorded=recorded,
        injected_faults=tuple(getattr(pacer, "injected_faults", ())),
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


def execute_inprocess(s: Schedule, rank: int, collectives: Any, *, run_id: str, device: str,
                      storage_root: str, mooncake_master: str, gated: bool, timeout_s: float,
                      nemesis: Any = None) -> RankResult:
    """`execute` as the in-process runner's job (scenarios/runner/inprocess.py)."""
    env = RunEnv(rank=rank, run_id=run_id, device=device, storage_root=storage_root,
                 mooncake_master=mooncake_master, gated=gated, agree_timeout_s=timeout_s)
    return execute(s, env, collectives, nemesis)
