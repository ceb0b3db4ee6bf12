"""The pacing seam: how a harness makes each rank's IO progress an explicit choice.

Production HiCache threads run free, so what a rank has finished at a decision point depends
on timing. A pacer turns that into a value: IO threads ask `before(stream, seq)` before each
unit of work and report `after(stream, seq)`; the scheduler calls `at(point, stream, issued)`
at each decision point, where the pacer may let some queued units finish and wait for them,
and `need(stream, seq)` where the scheduler cannot go on until unit `seq` is done; with
`counted=False` the unit's work is waited for but no later `at` counts it as seen through this
wait (a forward waits for its loads on the device stream, while the CPU reads the load events
only at `loading_check`: SGLang's next check may still find them unfinished).
`at` returns how many units of the stream the decision may count as done (units 0 .. n-1):
a snapshot taken with the choice, so a unit that finishes while the scheduler reads its acks
cannot make the read differ from what a pacer recorded (free-running: `issued`, no bound).
`fail(call, seq)` lets a pacer make one storage call fail on this rank (seq counts the calls
of that kind: prefetch queries for "exists", batch reads for "get", backups for "set"); `now()` is the clock
that prefetch timeouts read. `seen(stream)` is how many units of a stream the decisions so far
let finish (None: no bound), for a read that takes no choice of its own (the drain's count of
pages the prefetch IO thread gave back). `drain` is set once the ops are done: the scheduler
then lets every unit it issued finish. With no pacer installed (the default) none of this runs.
"""

from __future__ import annotations

import time
from typing import Protocol


class Pacer(Protocol):
    drain: bool

    def before(self, stream: str, seq: int) -> None: ...

    def after(self, stream: str, seq: int) -> None: ...

    def at(self, point: str, stream: str, issued: int) -> int: ...

    def need(self, stream: str, seq: int, counted: bool = True) -> None: ...

    def fail(self, call: str, seq: int) -> bool: ...

    def seen(self, stream: str) -> int | None: ...

    def now(self) -> float: ...

    def release_all(self) -> None: ...


class FreeRunning:
    """The default: no gates, real clock, no injected faults."""

    drain = False

    def before(self, stream: str, seq: int) -> None:
        pass

    def after(self, stream: str, seq: int) -> None:
        pass

    def at(self, point: str, stream: str, issued: int) -> int:
        return issued

    def need(self, stream: str, seq: int, counted: bool = True) -> None:
        pass

    def fail(self, call: str, seq: int) -> bool:
        return False

    def seen(self, stream: str) -> int | None:
        return None

    def now(self) -> float:
        return time.monotonic()

    def release_all(self) -> None:
        pass


FREE_RUNNING = FreeRunning()
