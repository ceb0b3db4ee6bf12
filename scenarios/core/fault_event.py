"""`FaultEvent`: one fault that fired, the one model of faults in a soak's report.

A soak used to count faults twice over: `faults` counted every delayed IO unit and failed call,
`fault_events` one entry per window at its first hit, so the two never matched. Now a fault is
one event (a window that acted, a SIGSTOP, a kill, a master restart); `hits` says how many IO
units or storage calls it acted on, and the report's `faults` counts events, nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict


class FaultEvent(BaseModel):
    """One fault that fired: when (seconds since the soak began), what, where, in which run."""

    model_config = ConfigDict(extra="allow")

    t: float
    kind: str
    #: the rank it acted on (-1: every rank, or the Mooncake master)
    rank: int = -1
    detail: str = ""
    #: IO units delayed or storage calls failed by it (1 for a SIGSTOP, kill or restart);
    #: None in reports of schema < 4, which did not say
    hits: int | None = 1
    #: the soak's run it fired in (1-based; 0: not known, reports of schema < 4)
    run: int = 0
    #: whether that run was a gated coverage chunk (its IO timing scripted by the Schedule)
    gated: bool = False


def count_events(events: Iterable[FaultEvent | dict[str, Any]],
                 kinds: Iterable[str] = ()) -> dict[str, int]:
    """Events per kind (every kind in `kinds` present, 0 if it never fired)."""
    c: Counter = Counter(e.kind if isinstance(e, FaultEvent) else str(e.get("kind"))
                         for e in events)
    return {**{k: 0 for k in kinds}, **dict(c)}
