"""The soak's watchdog: checks the infrastructure while a run is in flight.

A run whose Mooncake master died used to hang for a minute and then read as agreement. The
watchdog checks every WATCH_EVERY_S what the run depends on (`check` returns a diagnosis, ""
while all is well); on a loss it records the diagnosis and interrupts the main thread with
SIGUSR1, whose handler raises `InfrastructureLost`, so the run ends `unknown` in seconds. While
a run is slow it prints what the soak is waiting on.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from scenarios.core.errors import InfrastructureLost

__all__ = ["InfrastructureLost", "Watchdog", "lost_raises"]

WATCH_EVERY_S = 0.5
#: a run in flight longer than this gets a progress line (then one every as many seconds)
SLOW_RUN_S = 5.0


def _raise_lost(signum: int, frame: Any) -> None:
    raise InfrastructureLost("infrastructure lost")


@contextmanager
def lost_raises() -> Iterator[bool]:
    """While inside, SIGUSR1 raises InfrastructureLost in the main thread (yields False when
    not on the main thread: the watchdog then cannot interrupt a run, only report after it)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.signal(signal.SIGUSR1, _raise_lost)
    try:
        yield True
    finally:
        with suppress(ValueError):
            signal.signal(signal.SIGUSR1, previous)


class Watchdog(threading.Thread):
    """Polls `check()`; on a loss sets `lost` and interrupts the main thread once."""

    def __init__(self, check: Callable[[], str], waiting_on: Callable[[], str | None],
                 can_interrupt: bool) -> None:
        super().__init__(name="soak-watchdog", daemon=True)
        self.check = check
        self.waiting_on = waiting_on
        self.can_interrupt = can_interrupt
        self.lost = ""
        self._stop_event = threading.Event()
        self._main = threading.main_thread().ident

    def run(self) -> None:
        last_line = time.monotonic()
        while not self._stop_event.wait(WATCH_EVERY_S):
            try:
                diagnosis = self.check()
            except Exception as e:  # a broken check is itself a harness problem: say so
                diagnosis = f"infrastructure check failed: {type(e).__name__}: {e}"
            if diagnosis:
                self.lost = diagnosis
                if self.can_interrupt and self._main is not None:
                    signal.pthread_kill(self._main, signal.SIGUSR1)
                return
            what = self.waiting_on()
            if what and time.monotonic() - last_line >= SLOW_RUN_S:
                last_line = time.monotonic()
                print(f"soak: {what}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)
