"""The seams that make SGLang's own HiCache run a Schedule deterministically on one rank.

- `GatedDevice` replaces `cache_controller.device_module`: an event recorded on the write or
  load stream completes only when this rank's Schedule says so (`Event.query()`).
- `IoGates` hold each storage call (`batch_get` of the prefetch IO thread, `batch_set` of the
  backup thread) until opened, and count operations in/out of each IO thread so the scheduler
  side can wait until a thread is *settled* (at a gate, or idle with nothing queued) before it
  reads anything: every value a decision point sees is then a function of the Schedule.
- `SglangPacer` consumes the Schedule's per-rank choices at SGLang's decision points.
The hit query (prefetch thread, which all-reduces) is not gated: every rank waits for it right
after `prefetch_from_storage`, at the same op, as the reference does.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from scenarios.client.gates import ChoiceStream, wait_for
from scenarios.core.errors import GateTimeout


class _Stream:
    def __init__(self, dev: GatedDevice, name: str | None = None) -> None:
        self.dev, self.name = dev, name

    def wait_event(self, event: Any) -> None:  # the copies are synchronous on CPU
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Event:
    def __init__(self, dev: GatedDevice, *a: Any, **k: Any) -> None:
        self.dev = dev
        self.stream: str | None = None
        self.seq = -1

    def record(self, stream: Any = None) -> None:
        s = stream if stream is not None else self.dev.current_stream()
        name = getattr(s, "name", None)
        with self.dev.lock:
            self.stream = name
            if name is not None:
                self.seq = self.dev.recorded[name]
                self.dev.recorded[name] += 1

    def query(self) -> bool:
        return self.stream is None or self.seq < self.dev.opened[self.stream]

    def synchronize(self) -> None:  # a blocking wait: the copy is done once waited for
        if self.stream is not None:
            with self.dev.lock:
                self.dev.opened[self.stream] = max(self.dev.opened[self.stream], self.seq + 1)

    def wait(self, stream: Any = None) -> None:
        pass


class GatedDevice:
    """Stands in for `torch.cpu` as the controller's device module."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recorded: dict[str, int] = defaultdict(int)
        self.opened: dict[str, int] = defaultdict(int)
        self._local = threading.local()
        self._default = _Stream(self)

    def Stream(self, *a: Any, **k: Any) -> _Stream:  # noqa: N802 - torch's name
        return _Stream(self)

    def Event(self, *a: Any, **k: Any) -> _Event:  # noqa: N802
        return _Event(self)

    @contextlib.contextmanager
    def stream(self, s: Any) -> Iterator[None]:
        prev = getattr(self._local, "cur", None)
        self._local.cur = s
        try:
            yield
        finally:
            self._local.cur = prev

    def current_stream(self, *a: Any) -> _Stream:
        return getattr(self._local, "cur", None) or self._default

    def synchronize(self, *a: Any) -> None:
        pass

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def name_streams(self, write: Any, load: Any) -> None:
        write.name, load.name = "write", "load"


class CountingQueue(queue.Queue):
    """A controller queue (class swapped in place, so blocked getters stay valid) that counts
    puts: operations entering an IO thread."""

    cpcheck_on_put: Any = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if self.cpcheck_on_put is not None and item is not None:
            self.cpcheck_on_put(item)

    def put_nowait(self, item: Any) -> None:
        self.put(item, False)


def count_puts(q: queue.Queue, on_put: Any) -> None:
    q.__class__ = CountingQueue
    q.cpcheck_on_put = on_put  # type: ignore[attr-defined]


class IoGates:
    """Per IO stream ("get", "set", "query"): a gate per call and an in/out operation count."""

    def __init__(self, rank: int, timeout_s: float) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.arrived: dict[str, int] = defaultdict(int)
        self.opened: dict[str, int] = defaultdict(int)
        self.done: dict[str, int] = defaultdict(int)
        self.at_gate: dict[str, bool] = defaultdict(bool)
        self.ops_in: dict[str, int] = defaultdict(int)
        self.ops_out: dict[str, int] = defaultdict(int)
        self.released = False
        self.waiting_on: dict[str, str] = {}
        #: exceptions that ended one of SGLang's IO threads (threading.excepthook)
        self.thread_errors: list[str] = []

    # IO thread side
    def before(self, stream: str) -> int:
        with self.cond:
            seq = self.arrived[stream]
            self.arrived[stream] += 1
            self.at_gate[stream] = True
            self.waiting_on[threading.current_thread().name] = f"gate {stream}#{seq}"
            self.cond.notify_all()
            wait_for(self.cond, lambda: seq < self.opened[stream] or self.released,
                     self.timeout_s, lambda: f"rank {self.rank}: held at gate {stream}#{seq} "
                     f"for {self.timeout_s:.0f} s")
            self.at_gate[stream] = False
            self.waiting_on.pop(threading.current_thread().name, None)
            return seq

    def after(self, stream: str) -> None:
        with self.cond:
            self.done[stream] += 1
            self.cond.notify_all()

    def op_in(self, stream: str) -> None:
        with self.cond:
            self.ops_in[stream] += 1
            self.cond.notify_all()

    def op_out(self, stream: str) -> None:
        with self.cond:
            self.ops_out[stream] += 1
            self.cond.notify_all()

    # scheduler side
    def settle(self, stream: str) -> bool:
        """Wait until the stream's thread is at a gate (True) or has no operation left (False)."""
        deadline = time.monotonic() + self.timeout_s
        with self.cond:
            while True:
                if self.at_gate[stream]:
                    return True
                if self.ops_in[stream] == self.ops_out[stream]:
                    return False
                if self.released:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GateTimeout(
                        f"rank {self.rank}: {stream} thread did not settle in "
                        f"{self.timeout_s:.0f} s (ops in {self.ops_in[stream]}, out "
                        f"{self.ops_out[stream]}, arrived {self.arrived[stream]}, done "
                        f"{self.done[stream]}); IO threads: {self.waiting_on or 'none at a gate'}"
                        + (f"; died: {self.thread_errors}" if self.thread_errors else "")
                        + f"; stacks: {io_stacks()}")
                self.cond.wait(min(left, 0.5))

    def open_one(self, stream: str) -> None:
        with self.cond:
            self.opened[stream] += 1
            target = self.opened[stream]
            self.cond.notify_all()
            wait_for(self.cond, lambda: self.done[stream] >= target or self.released,
                     self.timeout_s, lambda: f"rank {self.rank}: {stream} unit {target - 1} "
                     f"opened but not done in {self.timeout_s:.0f} s")

    def release_all(self) -> None:
        with self.cond:
            self.released = True
            self.cond.notify_all()


def io_stacks() -> str:
    """Innermost frames of SGLang's IO threads: where a thread that never settled sits."""
    import sys
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        name = names.get(ident, "")
        if "func" in name:  # SGLang's threads are named after their target functions
            fr = traceback.extract_stack(frame)[-3:]
            out.append(f"{name} at " + " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(fr)))
    return "; ".join(out) or "no IO thread alive"


class SglangPacer(ChoiceStream):
    """The Schedule's per-rank choices, read at SGLang's decision points."""

    def __init__(self, rank: int, choices: list[int], faults: list, clock_skew: int,
                 dev: GatedDevice, gates: IoGates) -> None:
        super().__init__(choices, faults, clock_skew)
        self.rank = rank
        self.dev = dev
        self.gates = gates
        self.trace: list[tuple[str, str, int]] = []

    def events(self, point: str, stream: str) -> None:
        """Completion events: how many more of the recorded copies this rank sees finished."""
        self._tick()
        c = self._choice()
        with self.dev.lock:
            done, issued = self.dev.opened[stream], self.dev.recorded[stream]
            target = self.target(done, issued, c)
            self.dev.opened[stream] = target
        self.trace.append((point, stream, target))

    def io(self, point: str, stream: str) -> None:
        """Storage IO: let up to `choice` more calls of the stream's thread run, one at a time."""
        self._tick()
        c = self._choice()
        n = 0
        while (c is None or n < c) and self.gates.settle(stream):
            self.gates.open_one(stream)
            n += 1
        self.gates.settle(stream)
        self.trace.append((point, stream, n))


def leading_done(acks: list) -> Any:
    """The acks at the head of an ack queue whose events have fired, in order: what a rank can
    pop now (SGLang pops from the front and stops at the first unfinished one)."""
    for ack in acks:
        if not ack[1].query():
            return
        yield ack


def record_terminated(cc: Any, driver: Any) -> None:
    """Wrap `cc.terminate_prefetch` so that the driver knows the completed token count SGLang
    returns when a prefetch is terminated (its outcome is logged from it)."""
    orig = cc.terminate_prefetch

    def terminate_prefetch(operation: Any) -> Any:
        out = orig(operation)
        driver._last_completed = out[0]
        return out
    cc.terminate_prefetch = terminate_prefetch
