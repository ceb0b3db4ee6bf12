"""0.5.20+ under PP: a later stage drains exactly the queue counts stage 0 agreed.

`UnifiedRadixCache._drain_storage_control_queues_impl` takes `n` items from each control queue
with a blocking `Queue.get()` ("Blocking if there are not enough n items"): stage 0's counts are
forwarded down the pipeline, and a later stage waits until its own IO threads have queued as
many. In a server those threads run freely; here they wait at the Schedule's gates, which the
scheduler thread opens only at a later step, so the wait would never end and the run would be
read as the release's hang or divergence. Instead, a stage whose queues stay short of the
forwarded counts for `WAIT_S` makes the run unknown (125), naming the queue: the harness cannot
drive that drain yet, which is no verdict on the release.
"""

from __future__ import annotations

import time
from typing import Any

from scenarios.core.errors import CannotJudge

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


def wait_for_forwarded_counts(cache: Any, cc: Any, counts: dict[str, tuple[str, int | None]],
                              wait_s: float = WAIT_S) -> None:
    """On a PP stage after the first: return once every queue holds its forwarded count, or
    raise CannotJudge after `wait_s`. Stage 0 (and PP 1) returns at once."""
    if getattr(cache, "pp_size", 1) <= 1 or getattr(cache, "pp_rank", 0) == 0:
        return
    deadline = time.monotonic() + wait_s
    while short := short_queues(cc, counts):
        if time.monotonic() >= deadline:
            raise CannotJudge(
                f"PP stage {cache.pp_rank} must drain stage 0's forwarded counts, but "
                f"{'; '.join(short)} after {wait_s:.0f} s: the items wait behind the harness's "
                "IO gates (the release would block in Queue.get()); this drain is not driven "
                "under PP yet")
        time.sleep(0.01)
