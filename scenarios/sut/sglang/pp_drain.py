"""0.5.20+ under PP: a later stage drains exactly the queue counts stage 0 agreed.

`UnifiedRadixCache._drain_storage_control_queues_impl` takes `n` items from each control queue
with a blocking `Queue.get()` ("Blocking if there are not enough n items"): stage 0's counts are
forwarded down the pipeline, and a later stage waits until its own IO threads have queued as
many. In a server those threads run freely; here they wait at the Schedule's gates, which the
scheduler thread opens only at a later step, so the wait would never end and the run would be
read as the release's hang or divergence. So while a later stage's queue is short, the gates of
the IO stream that fills it (`STREAMS_OF`) open one unit at a time, as the free-running thread
would have run while the release blocked. A queue still short after `WAIT_S` (its items come
from no gated stream) makes the run unknown (125), naming the queue: no verdict on the release.
"""

from __future__ import annotations

import time
from typing import Any

from scenarios.core.errors import CannotJudge

#: the storage IO stream whose calls fill each control queue: the backup thread's `batch_set`
#: acks a backup, the prefetch IO thread's `batch_get` acks a prefetch and returns its unused
#: host pages (the hit query is not gated: its queues fill on their own)
STREAMS_OF = {"ack_backup_queue": ("set",), "ack_prefetch_queue": ("get",),
              "host_mem_release_queue": ("get",)}

#: how long a later stage's queues may take to reach stage 0's counts (IO threads not held at a
#: gate get there in milliseconds; a loaded 2-core box needs more)
WAIT_S = 5.0


def short_queues(cc: Any, counts: dict[str, tuple[str, int | None]]) -> list[str]:
    """'queue has k of n' for each control queue holding fewer items than the agreed count."""
    out = []
    for param, (queue, n) in counts.items():
        q = getattr(cc, queue, None)
        if n is not None and q is not None and q.qsize() < n:
            out.append(f"{queue} has {q.qsize()} of {n} ({param})")
    return out


def open_awaited_io(gates: Any, cc: Any, counts: dict[str, tuple[str, int | None]]) -> str | None:
    """Open one gated unit of a stream that fills a short queue; the stream, or None when no
    such stream's thread is at its gate."""
    for _param, (queue, n) in counts.items():
        q = getattr(cc, queue, None)
        if n is None or q is None or q.qsize() >= n:
            continue
        for stream in STREAMS_OF.get(queue, ()):
            if gates.at_gate[stream]:
                gates.open_one(stream)
                return stream
    return None


def wait_for_forwarded_counts(cache: Any, cc: Any, counts: dict[str, tuple[str, int | None]],
                              gates: Any = None, opened: list[str] | None = None,
                              wait_s: float = WAIT_S) -> None:
    """On a PP stage after the first: return once every queue holds its forwarded count,
    opening the IO gates that fill them (`gates`; each opened stream appended to `opened`), or
    raise CannotJudge after `wait_s`. Stage 0 (and PP 1) returns at once."""
    if getattr(cache, "pp_size", 1) <= 1 or getattr(cache, "pp_rank", 0) == 0:
        return
    deadline = time.monotonic() + wait_s
    while short := short_queues(cc, counts):
        stream = open_awaited_io(gates, cc, counts) if gates is not None else None
        if stream is not None:
            if opened is not None:
                opened.append(stream)
            deadline = time.monotonic() + wait_s  # progress: the next item gets its own wait
            continue
        if time.monotonic() >= deadline:
            raise CannotJudge(
                f"PP stage {cache.pp_rank} must drain stage 0's forwarded counts, but "
                f"{'; '.join(short)} after {wait_s:.0f} s: the items wait behind the harness's "
                "IO gates (the release would block in Queue.get()); this drain is not driven "
                "under PP yet")
        time.sleep(0.01)
