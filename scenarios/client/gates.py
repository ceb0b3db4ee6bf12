"""GatedPacer: the harness side of reference/pacing.py, driven by a Schedule's choices.

IO threads stop at a gate before each unit of work; at each decision point the scheduler thread
consumes one choice, opens the gates of that stream far enough and waits until exactly that many
units are done. Every local value a decision reads is then a function of the Schedule.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

from scenarios.core.errors import GateTimeout

#: the reference's storage IO streams (prefetch batch reads, backups): a choice past what is
#: pending lets all of it finish, as SGLang's driver does for its "get" and "set" calls
#: (seams.SglangPacer.io), so a Schedule's choice means the same progress on both SUTs
STORAGE_STREAMS = frozenset({"prefetch_io", "backup"})


def wait_for(cond: threading.Condition, done: Callable[[], bool], timeout_s: float,
             why: Callable[[], str]) -> None:
    """Wait on `cond` (held by the caller) until `done()`; past `timeout_s`, GateTimeout with
    `why()`: which rank was held where, so a hang names itself."""
    deadline = time.monotonic() + timeout_s
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            raise GateTimeout(why())
        cond.wait(left)


class ChoiceStream:
    """A rank's Schedule choices and planted faults, read in order at its decision points, and
    its logical clock: what pacing means on every SUT. A choice is how many more units of a
    stream finish before the decision reads it, modulo what is pending (`target`); past the
    last choice, or while draining, everything pending finishes."""

    def __init__(self, choices: list[int], faults: list[tuple[str, int]] | list,
                 clock_skew: int = 0) -> None:
        self._choices = list(choices)
        self._next = 0
        self._faults = {(c, int(s)) for c, s in faults}
        self._skew = clock_skew
        self._ticks = 0
        self.drain = False

    def _choice(self) -> int | None:
        """The next choice (one decision point consumes one), None once drained or exhausted."""
        if self.drain or self._next >= len(self._choices):
            return None
        c = self._choices[self._next]
        self._next += 1
        return c

    def _tick(self) -> None:
        self._ticks += 1

    @staticmethod
    def target(done: int, issued: int, choice: int | None, clamp: bool = False) -> int:
        """How far a stream may get at this point: `choice` more of what is pending, modulo
        what is pending (copy events) or at most all of it (`clamp`: storage IO, which
        SGLang's driver opens one call at a time while its thread waits at a gate)."""
        pending = max(issued - done, 0)
        if choice is None:
            return done + pending
        return done + (min(choice, pending) if clamp else choice % (pending + 1))

    def fail(self, call: str, seq: int) -> bool:
        return (call, seq) in self._faults

    def now(self) -> float:
        return float(self._ticks + self._skew)


class GatedPacer(ChoiceStream):
    """Opens IO units as the Schedule says. A soak's nemesis acts here too (a gated coverage
    chunk meets the faults asked for): its delays and kills come before the gate, where they
    cannot change what the Schedule decides, and the storage calls it fails are kept in
    `injected_faults` so the soak's replay Schedule scripts them."""

    def __init__(self, rank: int, choices: list[int], faults: list[tuple[str, int]],
                 clock_skew: int = 0, wait_timeout_s: float = 20.0,
                 nemesis=None) -> None:  # noqa: ANN001
        super().__init__(choices, faults, clock_skew)
        self.rank = rank
        self.nemesis = nemesis
        #: storage faults the nemesis injected, as (call, seq): scripted faults of a replay
        self.injected_faults: list[tuple[str, int]] = []
        self._timeout = wait_timeout_s
        self._cond = threading.Condition()
        self._opened: dict[str, int] = defaultdict(int)
        self._done: dict[str, int] = defaultdict(int)
        #: units a decision counted as finished: what a choice adds to (a `need` with
        #: counted=False lets units run without raising it)
        self._counted: dict[str, int] = defaultdict(int)
        self._released = False
        self.waiting_on: dict[str, str] = {}
        #: what this rank actually chose at each point, for reports
        self.trace: list[tuple[str, str, int, int]] = []

    # -- IO thread side ------------------------------------------------------------------
    def before(self, stream: str, seq: int) -> None:
        if self.nemesis is not None:
            self.nemesis.io_delay(self.rank, stream)
        name = threading.current_thread().name
        with self._cond:
            self.waiting_on[name] = f"gate {stream}#{seq}"
            wait_for(self._cond, lambda: seq < self._opened[stream] or self._released,
                     self._timeout, lambda: f"rank {self.rank}: {name} held at gate "
                     f"{stream}#{seq} for {self._timeout:.0f} s")
            self.waiting_on.pop(name, None)

    def after(self, stream: str, seq: int) -> None:
        with self._cond:
            self._done[stream] = max(self._done[stream], seq + 1)
            self._cond.notify_all()

    def fail(self, call: str, seq: int) -> bool:
        if super().fail(call, seq):
            return True
        if self.nemesis is not None and self.nemesis.storage_fails(self.rank, call):
            self.injected_faults.append((call, seq))
            return True
        return False

    # -- scheduler side ------------------------------------------------------------------
    def at(self, point: str, stream: str, issued: int) -> int:
        self._tick()
        with self._cond:
            done = self._counted[stream]
        target = self.target(done, issued, self._choice(), clamp=stream in STORAGE_STREAMS)
        self.trace.append((point, stream, issued, target))
        self._open_and_wait(stream, target)
        with self._cond:
            self._counted[stream] = max(self._counted[stream], target)
        return target

    def need(self, stream: str, seq: int, counted: bool = True) -> None:
        self._open_and_wait(stream, seq + 1)
        if counted:
            with self._cond:
                self._counted[stream] = max(self._counted[stream], seq + 1)

    def seen(self, stream: str) -> int | None:
        return None  # a unit runs only once a point opened it, and that point waited for it

    def _open_and_wait(self, stream: str, target: int) -> None:
        with self._cond:
            self._opened[stream] = max(self._opened[stream], target)
            self._cond.notify_all()
            wait_for(self._cond, lambda: self._done[stream] >= target or self._released,
                     self._timeout, lambda: f"rank {self.rank}: scheduler waited "
                     f"{self._timeout:.0f} s for {stream} to reach {target} (done "
                     f"{self._done[stream]}); IO threads: {self.waiting_on or 'none at a gate'}")

    def release_all(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()


class RecordingPacer:
    """Free-running (no gates) but records what each decision point saw, as Schedule choices.

    A choice in a Schedule is how many more units of a stream finished since the last point
    that opened that stream; here that is read off the real threads. Faults injected by a
    nemesis go through `fail` and are recorded as they fire.
    """

    def __init__(self, rank: int, nemesis=None, wait_timeout_s: float = 20.0) -> None:  # noqa: ANN001
        self.rank = rank
        self._timeout = wait_timeout_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._released = False
        self._done: dict[str, int] = defaultdict(int)
        self._seen: dict[str, int] = defaultdict(int)
        self.choices: list[int] = []
        self.faults: list[tuple[str, int]] = []
        self.nemesis = nemesis
        self.drain = False
        self.waiting_on: dict[str, str] = {}

    def before(self, stream: str, seq: int) -> None:
        if self.nemesis is not None:
            self.nemesis.io_delay(self.rank, stream)

    def after(self, stream: str, seq: int) -> None:
        with self._cond:
            self._done[stream] = max(self._done[stream], seq + 1)
            self._cond.notify_all()

    def fail(self, call: str, seq: int) -> bool:
        if self.nemesis is not None and self.nemesis.storage_fails(self.rank, call):
            self.faults.append((call, seq))
            return True
        return False

    def now(self) -> float:
        return time.monotonic()

    def at(self, point: str, stream: str, issued: int) -> int:
        """Record how many units finished, and bound the decision's read to them: an IO
        thread marks its ack done before `after`, so a unit finishing during the read would
        otherwise be seen by the scheduler but missing from the choice (a replay then
        disagrees with the run it replays)."""
        with self._lock:
            # a point opens no unit past those it issued (a replay's choice wraps modulo the
            # units pending, so counting a later op's finished batches would open fewer)
            # units < seen were opened (and waited for) by an earlier point, as in a replay
            done = max(min(self._done[stream], issued), self._seen[stream])
            self.choices.append(done - self._seen[stream])
            self._seen[stream] = done
        return done

    def need(self, stream: str, seq: int, counted: bool = True) -> None:
        """Wait, as a gated replay does, for unit `seq`: the threads run free meanwhile, but
        the scheduler reads nothing before it, so the recorded choices replay faithfully
        (`counted=False`: the next point's choice counts the unit)."""
        deadline = time.monotonic() + self._timeout
        with self._cond:
            while self._done[stream] <= seq and not self._released:
                left = deadline - time.monotonic()
                if left <= 0:
                    break  # the reference's own timeout names what is missing
                self._cond.wait(min(left, 0.5))
            if counted:
                self._seen[stream] = max(self._seen[stream], seq + 1)

    def seen(self, stream: str) -> int | None:
        """Units of `stream` the points so far recorded as finished: a read that takes no
        choice counts no unit past them (its replay has not run those yet)."""
        with self._lock:
            return self._seen[stream]

    def release_all(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()
