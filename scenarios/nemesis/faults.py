"""A Jepsen-style nemesis for free-running soaks: faults injected on a seeded schedule.

The reference code never calls the nemesis itself; `scenarios.client.gates.RecordingPacer` asks it
before each unit of IO work (`io_delay`) and before each storage call (`storage_fails`), so
faults land exactly where production timing varies. Each run gets a fresh fault plan (windows
relative to the run's start) drawn from one `random.Random(seed)`, so the same seed gives the
same plans; which IO unit a window hits still depends on real timing, which is why the pacer
records the faults that fired and the soak writes them into the replay Schedule.

Under torchrun (`arm` with the workers' pids) the faults act on real processes: slow_rank
SIGSTOPs a worker for its window, storage_latency SIGSTOPs the Mooncake master (a worker-side
delay for backends without one), master_restart restarts the master, kill_rank SIGKILLs a
worker (the executor then starts a fresh pool: a gloo world cannot readmit one rank), and
storage_errors travel to the workers as a plan (`wire` / `from_wire`) their pacers apply. A run
broken by a kill we injected is not a divergence: `explain()` gives the diagnosis and the soak
counts the run as unknown.

Over several hosts (`--nnodes`), stop_agent SIGSTOPs one other host's whole agent (the `cpcheck
agent` loop, its torchrun and its workers) for its window and kill_agent SIGKILLs it; both reach
agents on this machine only (one machine as several hosts): a remote agent's processes are out
of reach, which the event says. The soak restarts a killed agent it can (scenarios/sut).
net_latency delays and net_drop cuts one other host's connections to the controller, through
the pool's TCP proxy for that host (scenarios/runner/netproxy.py says what that reaches).
Gated coverage chunks meet the same faults (the gated pacer calls the same hooks); what fired
is one `FaultEvent` per window that acted (with its `hits`), per SIGSTOP, kill or restart.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from scenarios.core.errors import NemesisError, RankKilled
from scenarios.core.fault_event import FaultEvent

KINDS = ("slow_rank", "storage_latency", "storage_errors", "master_restart", "kill_rank",
         "stop_agent", "kill_agent", "net_latency", "net_drop")
#: faults on one other host (a pool over hosts): the Window's `rank` is the node
AGENT_KINDS = ("stop_agent", "kill_agent")
NET_KINDS = ("net_latency", "net_drop")
HOST_KINDS = AGENT_KINDS + NET_KINDS


@dataclass(frozen=True)
class Window:
    """One fault active from `start_s` to `end_s` after the run began (rank -1 = every rank)."""

    kind: str
    rank: int
    start_s: float
    end_s: float
    delay_s: float = 0.0
    probability: float = 1.0

    def covers(self, rank: int, t: float) -> bool:
        return (self.rank < 0 or self.rank == rank) and self.start_s <= t < self.end_s


#: fault events kept for the report (`counts` keeps counting past it)
MAX_EVENTS = 20_000

#: the calls storage_errors fail
STORAGE_CALLS = ("exists", "get", "set")

#: faults the torchrun workers apply themselves (the rest act on processes from the controller)
WORKER_KINDS = ("storage_errors", "storage_latency")


@dataclass
class Nemesis:
    """Thread-safe fault injector; `begin_run` draws a plan, the pacer hooks apply it."""

    kinds: tuple[str, ...] = ()
    seed: int = 0
    restart: Callable[[], None] | None = None
    #: chance that an enabled kind is active in a given run
    rate: float = 0.6
    #: hits per kind (IO units delayed, calls failed): what a worker sends back to `collect`
    injected: Counter = field(default_factory=Counter)
    #: fault events per kind, also those past MAX_EVENTS: the report's `faults`
    fired: Counter = field(default_factory=Counter)
    plan: list[Window] = field(default_factory=list)
    #: the Mooncake master (scenarios.nemesis.mooncake_master.MooncakeMaster) process faults act on
    master: Any = None
    #: least seconds between two runs with this kind (a kill restarts a whole torchrun pool)
    min_gap_s: dict[str, float] = field(default_factory=dict)
    #: what fired, with times in seconds since the nemesis was made (the soak's start)
    events: list[FaultEvent] = field(default_factory=list)
    #: hosts of the pool (agent faults pick one of nodes 1..nnodes-1: never the controller's)
    nnodes: int = 1
    #: agents kill_agent killed (runner.multihost.LocalAgent), for the executor to restart
    killed_agents: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise NemesisError(f"unknown fault kind '{bad[0]}': choose from {', '.join(KINDS)}")
        self._rng = random.Random(self.seed)
        # per-call draws happen on IO threads in timing order: keep them off the plan's RNG
        self._call_rng = random.Random(self.seed + 1)
        self._lock = threading.Lock()
        self._created = time.monotonic()
        self._t0 = time.monotonic()
        self._timer: threading.Timer | None = None
        self._killed: set[int] = set()
        self._kill_note = ""
        self._last_run: dict[str, float] = {}
        self._window_events: dict[int, FaultEvent | None] = {}
        self._run_no = 0
        self._gated = False
        self._worker_plan: list[Window] = []
        self._armed_at = 0.0
        self._actuator: _ProcessActuator | None = None
        self.torchrun = False
        # running mean of faulted run durations: where plan windows fall (None until one ran:
        # a first guess far above real run lengths puts most windows after the run has ended)
        self._run_s: float | None = None

    @classmethod
    def parse(cls, spec: str | None, seed: int = 0,
              restart: Callable[[], None] | None = None) -> Nemesis:
        """`"slow_rank,storage_errors"` -> Nemesis; "" / "none" -> one that injects nothing."""
        kinds = tuple(k.strip() for k in (spec or "").split(",") if k.strip())
        if kinds == ("none",):
            kinds = ()
        return cls(kinds=kinds, seed=seed, restart=restart)

    @property
    def active(self) -> bool:
        return bool(self.kinds)

    def attach_master(self, master: Any) -> None:
        """Faults on the storage side act on this master (restart, SIGSTOP)."""
        self.master = master
        self.restart = master.restart

    def unsupported(self) -> str | None:
        """What this nemesis was asked for but cannot do here (call after `attach_master`)."""
        if "master_restart" in self.kinds and self.restart is None:
            return ("fault 'master_restart' needs a Mooncake master this soak starts itself "
                    "(--backend mooncake without --mooncake-master)")
        return self.unsupported_agents()

    def unsupported_agents(self) -> str | None:
        """Agent faults need a pool over hosts (nothing else has an agent to stop)."""
        kind = next((k for k in self.kinds if k in HOST_KINDS), None)
        if kind and self.nnodes < 2:
            return (f"fault '{kind}' acts on another host: it needs --mode torchrun "
                    "--nnodes N > 1")
        return None

    @property
    def needs_links(self) -> bool:
        """Whether the pool must route other hosts through proxies (network faults)."""
        return any(k in NET_KINDS for k in self.kinds)

    def now(self) -> float:
        """Seconds since the nemesis was made (the soak's clock for events)."""
        return round(time.monotonic() - self._created, 3)

    def _event(self, kind: str, rank: int, detail: str, hits: int = 1,
               t: float | None = None) -> FaultEvent | None:
        """Record one fault that fired (None once MAX_EVENTS are kept; it still counts). An
        event with no hits is a note (a fault that could not reach its target): kept, not
        counted as fired."""
        with self._lock:
            if hits:
                self.fired[kind] += 1
            if len(self.events) >= MAX_EVENTS:  # a long in-process soak fires ~10^5 windows
                return None
            ev = FaultEvent(t=self.now() if t is None else round(t, 3), kind=kind, rank=rank,
                            detail=detail, hits=hits, run=self._run_no, gated=self._gated)
            self.events.append(ev)
            return ev

    # -- soak side -------------------------------------------------------------------------
    def begin_run(self, world_size: int, expected_s: float | None = None, *, run: int = 0,
                  gated: bool = False) -> list[Window]:
        """Draw this run's fault plan; windows fall inside the first `expected_s` seconds
        (default: the mean length of recent runs, so they land inside runs of any speed).
        `run` and `gated` are written into the events this plan fires."""
        if expected_s is None:
            expected_s = min(max(self._run_s or 0.5, 0.05), 2.0)
        rng = self._rng
        plan: list[Window] = []
        now = time.monotonic()
        for kind in self.kinds:
            if rng.random() >= self.rate:
                continue
            start = rng.uniform(0.0, expected_s * 0.5)
            end = start + rng.uniform(expected_s * 0.2, expected_s)
            rank = rng.randrange(world_size)
            if kind == "slow_rank":
                w = Window(kind, rank, start, end, delay_s=rng.uniform(0.001, 0.02))
            elif kind == "storage_latency":
                w = Window(kind, -1, start, start + rng.uniform(0.02, 0.15),
                           delay_s=rng.uniform(0.002, 0.01))
            elif kind == "storage_errors":
                w = Window(kind, rank, start, end, probability=rng.uniform(0.2, 0.8))
            elif kind == "master_restart":
                w = Window(kind, -1, start, start)
            elif kind in HOST_KINDS:  # rank: one of the other hosts' nodes
                node = 1 + rank % max(self.nnodes - 1, 1)
                if kind == "stop_agent":
                    w = Window(kind, node, start, start + rng.uniform(expected_s * 0.1,
                                                                      expected_s * 0.5))
                elif kind == "net_latency":
                    w = Window(kind, node, start, end, delay_s=rng.uniform(0.002, 0.05))
                else:  # kill_agent, net_drop: the host is lost for this run
                    w = Window(kind, node, start * 0.5, 1e9)
            else:  # kill_rank: in-process at the rank's first IO, under torchrun at a time
                w = Window(kind, rank, start * 0.5 if self.torchrun else 0.0, 1e9)
            if now - self._last_run.get(kind, -1e9) < self.min_gap_s.get(kind, 0.0):
                continue  # too soon after the last one (every draw above is made regardless)
            self._last_run[kind] = now
            plan.append(w)
        with self._lock:
            self.plan = plan
            self._killed.clear()
            self._kill_note = ""
            self._window_events.clear()
            self._worker_plan = []
            self._run_no, self._gated = run, gated
            self._t0 = time.monotonic()
        if not self.torchrun:  # under torchrun `arm` starts the clock once the job is sent
            for w in plan:
                if w.kind == "master_restart":
                    self._timer = threading.Timer(w.start_s, self._do_restart)
                    self._timer.daemon = True
                    self._timer.start()
        return plan

    def end_run(self) -> None:
        """Stop process faults (SIGCONT whatever is stopped) and wait for a pending master
        restart, so nothing overlaps the next run's plan."""
        self.disarm()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.join(timeout=30.0)
        with self._lock:
            self.plan = []
        run_s = time.monotonic() - self._t0
        run_s = min(run_s, 5.0)
        self._run_s = run_s if self._run_s is None else 0.8 * self._run_s + 0.2 * run_s

    def explain(self) -> str | None:
        """Why the last run broke, when it was our doing (a rank we killed); else None."""
        with self._lock:
            if not self._killed:
                return None
            return self._kill_note or f"nemesis killed rank(s) {sorted(self._killed)}"

    def _do_restart(self) -> None:
        self._count("master_restart")
        self._event("master_restart", -1, "master restarted")
        if self.restart is not None:
            self.restart()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def _note_kill(self, who: int, note: str) -> None:
        """Remember that this run broke by our doing (`explain` says so): `who` is the rank, or
        -1 - node for a whole agent."""
        with self._lock:
            self._killed.add(who)
            self._kill_note = note

    def _windows(self, rank: int) -> list[Window]:
        t = time.monotonic() - self._t0
        with self._lock:
            return [w for w in self.plan if w.covers(rank, t)]

    def _hit(self, w: Window, rank: int) -> None:
        """One IO unit or call this window acted on: its event at the first, `hits` after."""
        with self._lock:
            self.injected[w.kind] += 1
            if id(w) in self._window_events:
                ev = self._window_events[id(w)]
                if ev is not None:
                    ev.hits = (ev.hits or 0) + 1
                return
            self._window_events[id(w)] = None
        ev = self._event(w.kind, w.rank, f"window {w.start_s:.3f}-{min(w.end_s, 1e3):.3f} s "
                                         f"of the run")
        with self._lock:
            self._window_events[id(w)] = ev

    # -- pacer hooks (IO threads) ----------------------------------------------------------
    def io_delay(self, rank: int, stream: str) -> None:
        """Before a unit of IO work: sleep for slow_rank / storage_latency, raise for kill_rank."""
        delay = 0.0
        for w in self._windows(rank):
            if w.kind == "kill_rank":
                self._count("kill_rank")
                self._note_kill(rank, f"nemesis killed rank {rank} at its {stream} IO")
                self._event("kill_rank", rank, f"killed at its {stream} IO")
                raise RankKilled(f"nemesis killed rank {rank} at its {stream} IO")
            if w.kind in ("slow_rank", "storage_latency"):
                self._hit(w, rank)
                delay += w.delay_s
        if delay:
            time.sleep(delay)

    def storage_fails(self, rank: int, call: str) -> bool:
        """Whether this storage call ("exists" | "get" | "set") fails on this rank now (a host
        allocation is not a storage call: storage_errors never refuse one)."""
        if call not in STORAGE_CALLS:
            return False
        for w in self._windows(rank):
            if w.kind == "storage_errors":
                with self._lock:
                    hit = self._call_rng.random() < w.probability
                if hit:
                    self._hit(w, rank)
                    return True
        return False

    def counts(self) -> dict[str, int]:
        """Fault events per kind asked for (the report's `faults`)."""
        with self._lock:
            return {k: int(self.fired.get(k, 0)) for k in self.kinds}

    def total(self) -> int:
        with self._lock:
            return int(sum(self.fired.values()))

    # -- torchrun: real processes ----------------------------------------------------------
    def for_torchrun(self) -> None:
        """Switch to process faults (a kill costs a pool restart: at most one per 30 s)."""
        self.torchrun = True
        self.min_gap_s.setdefault("kill_rank", 30.0)
        self.min_gap_s.setdefault("kill_agent", 30.0)  # a lost agent restarts, then rejoins
        self.min_gap_s.setdefault("net_drop", 30.0)
        self.min_gap_s.setdefault("master_restart", 5.0)

    def worker_kinds(self) -> tuple[str, ...]:
        kinds = ["storage_errors"]
        if self.master is None:  # no master to freeze: the workers delay their own IO
            kinds.append("storage_latency")
        return tuple(kinds)

    def arm(self, pids: list[int], agents: dict[int, Any] | None = None,
            links: dict[int, Any] | None = None) -> dict | None:
        """Start this run's process faults against worker `pids` (rank order) and the other
        hosts' `agents` on this machine (node -> runner.multihost.LocalAgent) and `links`
        (node -> runner.netproxy.TcpProxy), and return the
        part of the plan the workers apply (`from_wire`), or None when there is none."""
        with self._lock:
            self._t0 = time.monotonic()
            plan = list(self.plan)
        local = [w for w in plan if w.kind in self.worker_kinds()]
        remote = [w for w in plan if w not in local]
        self._worker_plan, self._armed_at = local, self.now()
        if remote:
            self._actuator = _ProcessActuator(self, remote, pids, agents or {}, links or {})
            self._actuator.start()
        if not local:
            return None
        return {"kinds": sorted({w.kind for w in local}), "seed": self._rng.randrange(1 << 30),
                "plan": [asdict(w) for w in local]}

    def disarm(self) -> None:
        act, self._actuator = self._actuator, None
        if act is not None:
            act.stop()

    def collect(self, results: list[Any]) -> None:
        """Add the faults the workers fired (their RankResults' `nemesis_injected`): one event
        per rank and window that acted, its hits as the worker counted them."""
        for r in results:
            for kind, n in r.nemesis_injected.items():
                if int(n) <= 0:
                    continue
                with self._lock:
                    self.injected[kind] += int(n)
                w = next((w for w in self._worker_plan
                          if w.kind == kind and w.rank in (-1, r.rank)), None)
                start = w.start_s if w is not None else 0.0
                self._event(kind, r.rank, f"window {start:.3f}-"
                            f"{w.end_s if w is not None else start:.3f} s of the run, applied "
                            f"by the worker", hits=int(n), t=self._armed_at + start)

    @classmethod
    def from_wire(cls, wire: dict | None) -> Nemesis | None:
        """A worker's nemesis: the plan it was sent, its clock starting now."""
        if not wire:
            return None
        nem = cls(kinds=tuple(wire["kinds"]), seed=int(wire["seed"]))
        nem.plan = [Window(**w) for w in wire["plan"]]
        return nem


class _ProcessActuator(threading.Thread):
    """Applies one run's process faults in time order on one thread, so a master restart and
    a master SIGSTOP never overlap; `stop()` cancels what is left and SIGCONTs everything."""

    def __init__(self, nem: Nemesis, windows: list[Window], pids: list[int],
                 agents: dict[int, Any] | None = None,
                 links: dict[int, Any] | None = None) -> None:
        super().__init__(name="nemesis-actuator", daemon=True)
        self.nem = nem
        self.pids = pids
        self.agents = agents or {}
        self.links = links or {}
        self._slowed: set[int] = set()  # nodes whose link has a delay now
        self._halt = threading.Event()
        self._stopped: set[int] = set()
        steps: list[tuple[float, int, str, Window]] = []
        for w in windows:
            if w.kind in ("slow_rank", "storage_latency", "stop_agent", "net_latency"):
                steps += [(w.start_s, 0, "stop", w), (w.end_s, 1, "cont", w)]
            elif w.kind in ("master_restart", "kill_rank", "kill_agent", "net_drop"):
                steps.append((w.start_s, 0, w.kind, w))
        self.steps = sorted(steps, key=lambda s: (s[0], s[1]))

    def _pid_for(self, w: Window) -> int | None:
        if w.kind == "storage_latency":
            return self.nem.master.pid if self.nem.master is not None else None
        return self.pids[w.rank] if 0 <= w.rank < len(self.pids) else None

    def run(self) -> None:
        t0 = self.nem._t0
        for at, _, action, w in self.steps:
            if self._halt.wait(max(0.0, t0 + at - time.monotonic())):
                return
            if w.kind in NET_KINDS:
                if self._net_fault(w, action, at):
                    return  # a host cut off: the pool is going down
                continue
            if w.kind in AGENT_KINDS:
                if self._agent_fault(w, action, at):
                    return  # an agent killed: the pool is going down
                continue
            pid = self._pid_for(w)
            if action == "stop" and pid is not None and _signal(pid, signal.SIGSTOP):
                self._stopped.add(pid)
                self.nem._count(w.kind)
                who = "master" if w.kind == "storage_latency" else f"rank {w.rank}"
                self.nem._event(w.kind, w.rank, f"SIGSTOP {who} (pid {pid}) for "
                                                f"{(w.end_s - w.start_s) * 1e3:.0f} ms")
            elif action == "cont" and pid in self._stopped:
                _signal(pid, signal.SIGCONT)
                self._stopped.discard(pid)
            elif action == "master_restart":
                self._cont_all()
                self.nem._do_restart()
            elif action == "kill_rank" and pid is not None:
                self._cont_all()
                self.nem._note_kill(w.rank, f"nemesis SIGKILLed rank {w.rank} (pid {pid}) "
                                            f"{at:.3f} s into the run")
                if _signal(pid, signal.SIGKILL):
                    self.nem._count("kill_rank")
                    self.nem._event("kill_rank", w.rank, f"SIGKILL pid {pid}")
                return  # the pool is going down: nothing else of this run matters

    def _agent_fault(self, w: Window, action: str, at: float) -> bool:
        """stop / cont / kill_agent on every process of node `w.rank`'s agent, root first (a
        stopped tree cannot react to its children stopping); True once an agent is killed."""
        agent = self.agents.get(w.rank)
        if agent is None:
            if action != "cont":
                self.nem._event(w.kind, w.rank, f"agent of node {w.rank} is not on this "
                                                "machine: its processes are out of reach", hits=0)
            return False
        pids = list(agent.pids)
        if action == "stop":
            stopped = [p for p in pids if _signal(p, signal.SIGSTOP)]
            if stopped:
                self._stopped.update(stopped)
                self.nem._count(w.kind)
                self.nem._event(w.kind, w.rank, f"SIGSTOP agent of node {w.rank} (pids "
                                                f"{stopped}) for {(w.end_s - w.start_s) * 1e3:.0f} ms")
        elif action == "cont":
            for p in reversed(pids):  # workers first, the loop last
                if p in self._stopped:
                    _signal(p, signal.SIGCONT)
                    self._stopped.discard(p)
        else:  # kill_agent
            self._cont_all()
            self.nem._note_kill(-1 - w.rank, f"nemesis SIGKILLed the agent of node {w.rank} "
                                             f"(pids {pids}) {at:.3f} s into the run")
            with self.nem._lock:
                self.nem.killed_agents.append(agent)
            if [p for p in pids if _signal(p, signal.SIGKILL)]:
                self.nem._count("kill_agent")
                self.nem._event("kill_agent", w.rank, f"SIGKILL agent of node {w.rank} "
                                                     f"(pids {pids})")
            return True
        return False

    def _net_fault(self, w: Window, action: str, at: float) -> bool:
        """net_latency: delay node `w.rank`'s link for the window; net_drop: cut it (True)."""
        link = self.links.get(w.rank)
        if link is None:
            if action != "cont":
                self.nem._event(w.kind, w.rank, f"no proxy in front of node {w.rank}: "
                                                "its traffic is out of reach", hits=0)
            return False
        if action == "stop":
            link.delay_s = w.delay_s
            self._slowed.add(w.rank)
            self.nem._count(w.kind)
            self.nem._event(w.kind, w.rank, f"+{w.delay_s * 1e3:.0f} ms each way on node "
                                            f"{w.rank}'s link for "
                                            f"{(w.end_s - w.start_s) * 1e3:.0f} ms")
        elif action == "cont":
            link.delay_s = 0.0
            self._slowed.discard(w.rank)
        else:  # net_drop
            self._cont_all()
            self.nem._note_kill(-1 - w.rank, f"nemesis dropped the connections of the agent of "
                                             f"node {w.rank} {at:.3f} s into the run")
            n = link.drop()
            self.nem._count("net_drop")
            self.nem._event("net_drop", w.rank, f"dropped {n} connection(s) of node {w.rank}")
            return True
        return False

    def _cont_all(self) -> None:
        for pid in list(self._stopped):
            _signal(pid, signal.SIGCONT)
        self._stopped.clear()
        for node in list(self._slowed):
            self.links[node].delay_s = 0.0
        self._slowed.clear()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30.0)
        self._cont_all()


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


