"""Skip the idle second in the construction of SGLang's cache, keeping what it does.

`HiRadixCache.__init__` ends with `reset()`, whose `HiCacheController.reset()` stops the storage
threads the controller has just started and joins them. They sit in `queue.get(timeout=1)`, so
every construction waited about 1 s for that timeout (measured on 0.5.10.post1: 1.00 s of a
1.02 s build, and a whole 1x2 run took 1.04 s). Here the release's own `_stop_storage_threads`
(its detach path: set the stop event, wake each thread with None, join prefetch, its IO aux
thread and backup) runs first, so the reset's joins return at once. The end state is the one
`reset()` makes: fresh threads, empty queues, clear events. In addition the old IO aux thread
(which `reset()` never joins) is known to be gone before the new one starts; without that, an
old aux thread that outlived the join window could serve the new prefetch buffer beside the new one.
The reset then waits until the new prefetch thread has made its buffer and aux thread, so the
harness hooks the new buffer, never the old one.
"""

from __future__ import annotations

import os
import time
from typing import Any

#: set (to anything) to run SGLang's reset unchanged, with its idle second (for comparisons)
IDLE_RESET_ENV = "CPCHECK_SGLANG_IDLE_RESET"

#: how long a new prefetch thread may take to start its aux thread (a loaded box)
START_TIMEOUT_S = 10.0


def install(cc_mod: Any) -> bool:
    """Patch the release's HiCacheController.reset once per worker; False if it cannot be."""
    cls = getattr(cc_mod, "HiCacheController", None)
    if os.environ.get(IDLE_RESET_ENV):
        return False
    if cls is None or not hasattr(cls, "_stop_storage_threads"):
        return False
    if getattr(cls.reset, "_cpcheck_quick", False):
        return True
    original = cls.reset

    def reset(self: Any) -> Any:
        storage = bool(getattr(self, "enable_storage", False))
        old_aux = getattr(self, "prefetch_io_aux_thread", None)
        if storage:
            self._stop_storage_threads()
        out = original(self)
        if storage and old_aux is not None:
            wait_started(self, old_aux)
        return out

    reset._cpcheck_quick = True  # type: ignore[attr-defined]
    reset.__wrapped__ = original  # type: ignore[attr-defined]
    cls.reset = reset
    return True


def wait_started(cc: Any, old_aux: Any, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the new prefetch thread runs its own aux thread (it makes its buffer first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        aux = getattr(cc, "prefetch_io_aux_thread", None)
        if aux is not None and aux is not old_aux and aux.is_alive():
            return
        time.sleep(0.001)
    raise RuntimeError(f"SGLang's prefetch thread did not start its IO aux thread in "
                       f"{timeout_s:.0f} s after reset()")
