"""A Jepsen-style nemesis for free-running soaks: faults injected on a seeded schedule.

The reference code never calls the nemesis itself; `scenarios.gates.RecordingPacer` asks it
before each unit of IO work (`io_delay`) and before each storage call (`storage_fails`), so
faults land exactly where production timing varies. Each run gets a fresh fault plan (windows
relative to the run's start) drawn from one `random.Random(seed)`, so the same seed gives the
same plans; which IO unit a window hits still depends on real timing, which is why the pacer
records the faults that fired and the soak writes them into the replay Schedule.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("slow_rank", "storage_latency", "storage_errors", "master_restart", "kill_rank")


class NemesisError(ValueError):
    """A bad --faults list; one line."""


class RankKilled(RuntimeError):
    """Raised inside a rank's IO thread by `kill_rank`: the run must end with a diagnosis."""


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


@dataclass
class Nemesis:
    """Thread-safe fault injector; `begin_run` draws a plan, the pacer hooks apply it."""

    kinds: tuple[str, ...] = ()
    seed: int = 0
    restart: Callable[[], None] | None = None
    #: chance that an enabled kind is active in a given run
    rate: float = 0.6
    injected: Counter = field(default_factory=Counter)
    plan: list[Window] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise NemesisError(f"unknown fault kind '{bad[0]}': choose from {', '.join(KINDS)}")
        self._rng = random.Random(self.seed)
        # per-call draws happen on IO threads in timing order: keep them off the plan's RNG
        self._call_rng = random.Random(self.seed + 1)
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._timer: threading.Timer | None = None
        self._killed: set[int] = set()

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

    # -- soak side -------------------------------------------------------------------------
    def begin_run(self, world_size: int, expected_s: float = 0.5) -> list[Window]:
        """Draw this run's fault plan; windows fall inside the first `expected_s` seconds."""
        rng = self._rng
        plan: list[Window] = []
        for kind in self.kinds:
            if rng.random() >= self.rate:
                continue
            start = rng.uniform(0.0, expected_s * 0.5)
            end = start + rng.uniform(expected_s * 0.2, expected_s)
            rank = rng.randrange(world_size)
            if kind == "slow_rank":
                plan.append(Window(kind, rank, start, end, delay_s=rng.uniform(0.001, 0.02)))
            elif kind == "storage_latency":
                plan.append(Window(kind, -1, start, start + rng.uniform(0.02, 0.15),
                                   delay_s=rng.uniform(0.002, 0.01)))
            elif kind == "storage_errors":
                plan.append(Window(kind, rank, start, end, probability=rng.uniform(0.2, 0.8)))
            elif kind == "master_restart":
                plan.append(Window(kind, -1, start, start))
            elif kind == "kill_rank":
                plan.append(Window(kind, rank, 0.0, 1e9))
        with self._lock:
            self.plan = plan
            self._killed.clear()
            self._t0 = time.monotonic()
        for w in plan:
            if w.kind == "master_restart":
                self._timer = threading.Timer(w.start_s, self._do_restart)
                self._timer.daemon = True
                self._timer.start()
        return plan

    def end_run(self) -> None:
        """Wait for a pending master restart so it never overlaps the next run's plan."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.join(timeout=30.0)
        with self._lock:
            self.plan = []

    def _do_restart(self) -> None:
        self._count("master_restart")
        if self.restart is not None:
            self.restart()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def _windows(self, rank: int) -> list[Window]:
        t = time.monotonic() - self._t0
        with self._lock:
            return [w for w in self.plan if w.covers(rank, t)]

    # -- pacer hooks (IO threads) ----------------------------------------------------------
    def io_delay(self, rank: int, stream: str) -> None:
        """Before a unit of IO work: sleep for slow_rank / storage_latency, raise for kill_rank."""
        delay = 0.0
        for w in self._windows(rank):
            if w.kind == "kill_rank":
                with self._lock:
                    self.injected["kill_rank"] += 1
                    self._killed.add(rank)
                raise RankKilled(f"nemesis killed rank {rank} at its {stream} IO")
            if w.kind in ("slow_rank", "storage_latency"):
                self._count(w.kind)
                delay += w.delay_s
        if delay:
            time.sleep(delay)

    def storage_fails(self, rank: int, call: str) -> bool:
        """Whether this storage call ("exists" | "get" | "set") fails on this rank now."""
        for w in self._windows(rank):
            if w.kind == "storage_errors":
                with self._lock:
                    hit = self._call_rng.random() < w.probability
                    if hit:
                        self.injected["storage_errors"] += 1
                if hit:
                    return True
        return False

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {k: int(self.injected.get(k, 0)) for k in self.kinds}

    def total(self) -> int:
        with self._lock:
            return int(sum(self.injected.values()))
