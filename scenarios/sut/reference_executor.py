"""Executor: runs Schedules in one mode and owns what lives across runs.

Modes: `inprocess` (ranks as threads over an in-memory collective: fast exploration) and
`torchrun` (a pool of long-lived torchrun workers with gloo groups: the truth). Pools are kept
per layout and rebuilt after any failed run, since a timed-out gloo group cannot be trusted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

from scenarios.core.contract import stop_requested
from scenarios.core.schedule import Schedule
from scenarios.core.suts import REFERENCE
from scenarios.core.timeouts import DEFAULT_AGREEMENT_S, Timeouts
from scenarios.core.verdict import Verdict
from scenarios.judge import checker
from scenarios.runner.pools import close_pools, drop_pool

MODES = ("inprocess", "torchrun")

#: most ranks an executor keeps alive across its pools (least recently used pools close first)
MAX_POOL_RANKS_ENV = "CPCHECK_MAX_POOL_RANKS"
#: the default on CUDA: every rank holds a CUDA context on its GPU; with `pytest -n 8` on one
#: H200, pools of every layout kept per worker ran CUDA out of memory at context creation
CUDA_MAX_POOL_RANKS = 8


def max_pool_ranks(device: str) -> int:
    """Ranks an executor may keep alive (0 = no bound: on CPU a rank costs host memory only)."""
    raw = os.environ.get(MAX_POOL_RANKS_ENV, "")
    if raw.strip():
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{MAX_POOL_RANKS_ENV}={raw!r} is not a whole number") from None
        if n < 0:
            raise ValueError(f"{MAX_POOL_RANKS_ENV}={raw!r} must be >= 0 (0: no bound)")
        return n
    return CUDA_MAX_POOL_RANKS if device == "cuda" else 0


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Executor:
    """The reference as a `SutExecutor` (scenarios/sut/__init__.py), in one mode."""

    sut = REFERENCE
    #: ranks that never finish froze in the reference's own agreement: a finding
    hangs_are_findings = True

    def __init__(self, mode: str = "inprocess", *, timeout_s: float = DEFAULT_AGREEMENT_S,
                 mooncake_master: str = "", device: str = "auto",
                 storage_root: str | None = None, nnodes: int = 1,
                 rdzv_endpoint: str | None = None, placement: str | None = None,
                 proxy_hosts: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
        self.mode = mode
        self.timeout_s = timeout_s
        self.mooncake_master = mooncake_master
        self.device = device
        self._own_root = storage_root is None
        self.storage_root = storage_root or tempfile.mkdtemp(prefix="cpcheck-store-")
        self._pools: dict[str, Any] = {}
        #: ranks spread over hosts (scenarios/runner/multihost.py): one pool at a time, since
        #: every pool uses the one rendezvous endpoint the agents know
        self.nnodes = nnodes
        self.rdzv_endpoint = rdzv_endpoint
        self.placement = placement or "torchrun"  # scenarios/runner/placement.py
        self.proxy_hosts = proxy_hosts  # other hosts through proxies (network faults)
        #: the other hosts' agents seen on this machine (node -> LocalAgent), kept past their
        #: loss so a lost one can be started again; the agents this executor restarted
        self.local_agents: dict[int, Any] = {}
        self._restarted: list[Any] = []
        #: the host the last run lost ("" if none): the soak counts that run and goes on
        self.lost_agent = ""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_backend(self, s: Schedule) -> None:
        if s.backend == "mooncake" and not self.mooncake_master:
            raise ValueError("backend 'mooncake' needs a master: pass --mooncake-master HOST:PORT "
                             "or let the harness start one")

    def run(self, s: Schedule, *, gated: bool = True, nemesis: Any = None) -> list[Any]:
        self._check_backend(s)
        refuse_decode_role(s)
        run_id = f"r{uuid.uuid4().hex[:10]}"
        if self.mode == "inprocess":
            from scenarios.runner.inprocess import run_schedule_inprocess
            from scenarios.sut.reference_rank import execute_inprocess

            return run_schedule_inprocess(
                s, execute_inprocess, gated=gated, storage_root=self.storage_root,
                mooncake_master=self.mooncake_master, timeout_s=self.timeout_s,
                run_id=run_id, nemesis=nemesis, device=self.resolved_device,
            )
        return self._run_torchrun(s, run_id, gated, nemesis)

    @property
    def resolved_device(self) -> str:
        """'auto' means CUDA where present: ranks share the GPUs, sync groups stay gloo."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def pool(self, layout: str) -> Any:
        from scenarios.runner import RankPool, RankPoolStartError

        pool = self._pools.pop(layout, None)
        if pool is None or not pool.running:
            pool = RankPool(layout, device=self.device,
                            collective_timeout_s=Timeouts(self.timeout_s).collective_s,
                            env={"MC_LOG_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"},
                            nnodes=self.nnodes, rdzv_endpoint=self.rdzv_endpoint,
                            placement=self.placement, proxy_hosts=self.proxy_hosts)
            self._make_room(pool.world_size)
            try:
                pool.start()
            except RankPoolStartError:
                # a host lost while the pool started: once its agent is started again here,
                # start again (an agent elsewhere is not waited for twice)
                if self.nnodes == 1 or not self.restart_lost_agents():
                    raise
                pool.start()
            if self.nnodes > 1:
                self.local_agents.update(pool.local_agents())
        self._pools[layout] = pool  # last: the most recently used
        return pool

    def _make_room(self, ranks: int) -> None:
        """Close least recently used pools until `ranks` more fit the rank bound."""
        bound = max_pool_ranks(self.resolved_device)
        if self.nnodes > 1:
            bound = 1  # any other pool closes: the agents serve one pool at a time
        while bound and self._pools and (
                sum(p.world_size for p in self._pools.values()) + ranks > bound):
            drop_pool(self._pools, next(iter(self._pools)), quietly=True)

    def _run_torchrun(self, s: Schedule, run_id: str, gated: bool,
                      nemesis: Any = None) -> list[Any]:
        from scenarios.runner import RankPoolError

        pool = self.pool(s.layout)
        payload = {"schedule": s.model_dump_json(), "run_id": run_id, "gated": gated,
                   "storage_root": self.storage_root, "mooncake_master": self.mooncake_master,
                   "collective_timeout_s": self.timeout_s}
        self.lost_agent = ""
        if nemesis is not None:  # faults on the real workers / master (scenarios.nemesis.faults)
            payload["nemesis"] = nemesis.arm([r.pid for r in pool.ranks],
                                             agents=pool.local_agents(), links=pool.links)
        try:
            results = pool.run("scenarios.sut.reference_jobs:run_schedule", payload,
                               timeout_s=Timeouts(self.timeout_s).run_s)
        except RankPoolError as e:
            drop_pool(self._pools, s.layout)
            node = getattr(e, "node", None)
            if node is not None:  # a whole host left: say which, start it again if it is here
                self.lost_agent = f"{(str(e).splitlines() or [''])[0]}{self.restart_lost_agents()}"
            raise
        finally:
            if nemesis is not None:
                nemesis.disarm()
                if nemesis.killed_agents:  # kill_agent: start it again for the next pool
                    nemesis.killed_agents.clear()
                    self.restart_lost_agents()
        if nemesis is not None:
            nemesis.collect(results)
            if nemesis.explain():  # a kill landed as the job finished: that pool is broken
                drop_pool(self._pools, s.layout)
        if any(r.error is not None for r in results):
            # leftover threads may still sit in gloo calls: start clean
            drop_pool(self._pools, s.layout)
        return results

    def judge(self, s: Schedule, results: list[Any]) -> Verdict:
        return checker.check(s, results)  # looked up per call: tests script the checker

    def restart_lost_agents(self) -> str:
        """Start again every agent on this machine whose `cpcheck agent` loop is gone (it
        rejoins the next pool); what was done, as a clause for the diagnosis. An agent on
        another host, or one started without the loop, is waited for by the next pool start
        (its start timeout is the deadline)."""
        from scenarios.runner.multihost import restart_agent

        done = []
        for node, agent in sorted(self.local_agents.items()):
            if not agent.restartable or _running(agent.pids[0]):
                continue
            self._restarted.append(restart_agent(agent))
            done.append(f"agent of node {node} restarted here (pid {self._restarted[-1].pid})")
        return f"; {', '.join(done)}" if done else ""

    def close(self) -> None:
        close_pools(self._pools)
        from scenarios.runner.multihost import stop_agent_process

        for proc in self._restarted:  # we started them: we stop them
            stop_agent_process(proc)
        self._restarted = []
        if self.mooncake_master and not stop_requested.is_set():
            # in-process ranks' clients outlive runs (storage_clients). After Ctrl-C / SIGTERM
            # they are left to die with the process: the soak has killed its master by then,
            # and closing a client of a dead master retries for seconds (the 3 s stop limit)
            from scenarios.client.storage_clients import close_all

            close_all()
        if self._own_root:
            shutil.rmtree(self.storage_root, ignore_errors=True)


def refuse_decode_role(s: Schedule) -> None:
    """The reference models a prefill (or mixed) server's cache, not the decode side of PD
    disaggregation: a Schedule with a `decode_add` op cannot be judged on it (125), only on
    SGLang, whose ranks must still agree with each other."""
    if any(op.kind == "decode_add" for op in s.ops):
        from scenarios.core.errors import CannotJudge

        raise CannotJudge("the reference does not model the decode side of PD disaggregation "
                          "(op 'decode_add'): run it with --sut sglang==VERSION (0.5.13+)")
