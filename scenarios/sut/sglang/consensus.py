"""SGLang's own rank-consensus checker (`sglang/srt/utils/rank_consensus_checker.py`, from
0.5.20), switched on beside cpcheck's checker so that the two can be compared per finding.

With `SGLANG_ENABLE_RANK_CONSENSUS_CHECKER=1` in the worker's environment before SGLang is
imported, `@rank_consensus` methods of the cache queue one event per call (name, selected
parameters, results) from the scheduler thread; a background thread drains the same count on
every rank (MIN over dedicated gloo groups), hashes them and compares hashes (MIN vs MAX). On a
mismatch it logs the events at CRITICAL and calls `os._exit(1)`.

What the server does and this CPU driving replaces: the Scheduler calls `configure()` with its
attention-CP and attention-TP groups (else its TP group) in its own thread; here the rank's job
thread (the one that drives the cache) calls it at the start of each run, with the same groups,
and flushes it at the end. The `os._exit(1)` is observed, not obeyed: the checker's thread stops
there (SystemExit), and the rank reports what it said, when, and after how many decisions.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

ENV = "SGLANG_ENABLE_RANK_CONSENSUS_CHECKER"
MODULE = "sglang.srt.utils.rank_consensus_checker"
#: how long the end-of-run flush waits for the checker's thread (it may be blocked in its
#: all-reduce when a peer queued fewer events and has nothing more to send)
FLUSH_S = 5.0


def enabled() -> bool:
    return os.environ.get(ENV, "").lower() in ("1", "true", "yes")


class _Watch:
    """What the checker did in one run on this rank."""

    def __init__(self, decisions: Callable[[], int]) -> None:
        self.decisions = decisions
        self.t0 = time.monotonic()
        self.fired_at: float | None = None
        self.decisions_at_fire: int | None = None
        self.message = ""
        self.events = 0  #: events queued for comparison
        self.refused = 0  #: assert_same calls from another thread (SGLang raises)

    def summary(self, stuck: bool, configured: bool) -> dict:
        return {"configured": configured, "fired": self.fired_at is not None,
                "fired_s": None if self.fired_at is None else self.fired_at - self.t0,
                "decisions_at_fire": self.decisions_at_fire, "message": self.message[:2000],
                "events": self.events, "refused": self.refused, "stuck_at_end": stuck,
                "t0": self.t0}


_WATCH: list[_Watch | None] = [None]


class _ExitSeam:
    """Stands in for the checker module's `os`: `_exit` records the fire and ends only the
    checker's thread; every other name is the real `os`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def _exit(code: int) -> None:
        w = _WATCH[0]
        if w is not None and w.fired_at is None:
            w.fired_at = time.monotonic()
            w.decisions_at_fire = w.decisions()
        raise SystemExit(code)


class _Said(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        w = _WATCH[0]
        if w is not None and record.levelno >= logging.CRITICAL and not w.message:
            w.message = record.getMessage()


def load() -> Any | None:
    """The checker module, with the fire seam installed, or None (off, or the release has
    none)."""
    if not enabled():
        return None
    try:
        import importlib

        mod = importlib.import_module(MODULE)
    except ModuleNotFoundError:
        return None
    if not isinstance(getattr(mod, "os", None), _ExitSeam):
        mod.os = _ExitSeam()
        mod.logger.addHandler(_Said())
    return mod


def start(mod: Any, groups: list, decisions: Callable[[], int], harness: set) -> None:
    """configure() as the Scheduler does, from this (the driving) thread; its dedicated groups
    join the harness's, so their all-reduces are not recorded as SGLang's collectives."""
    _WATCH[0] = _Watch(decisions)
    put = mod.assert_same

    def counted(*a: Any, **k: Any) -> None:
        w = _WATCH[0]
        try:
            put(*a, **k)
        except RuntimeError:  # not from the thread configure() ran in: SGLang refuses it
            if w is not None:
                w.refused += 1
            raise
        if mod.enabled() and w is not None:
            w.events += 1
    if not getattr(put, "_cpcheck", False):
        counted._cpcheck = True  # type: ignore[attr-defined]
        mod.assert_same = counted
    mod.configure(groups)
    for g in mod._sync_groups:
        harness.add(id(g))


def finish(mod: Any) -> dict:
    """Flush the queue (the checker compares what is left), stop its thread and report."""
    w = _WATCH[0]
    q, worker = mod._q, mod._worker_thread
    stuck = False
    if q is not None:
        q.put(None)
        if worker is not None:
            worker.join(FLUSH_S)
            stuck = worker.is_alive()
        if not stuck:
            mod._destroy_dedicated_groups()
        mod._q, mod._worker_thread, mod._sync_groups, mod._scheduler_thread = \
            None, None, [], None
    _WATCH[0] = None
    return (w or _Watch(lambda: 0)).summary(stuck, q is not None)


def first_divergent_decision(results: list) -> int | None:
    """Index of the first scheduler decision (or the tree digest after it) on which some rank
    differs from rank 0; None when they all agree."""
    lists = [(list(r.decisions.get("scheduler", ())), list(r.digests)) for r in results]
    if len(lists) < 2:
        return None
    n = max(max(len(d), len(g)) for d, g in lists)
    for i in range(n):
        firsts = {(repr(d[i]) if i < len(d) else None, g[i] if i < len(g) else None)
                  for d, g in lists}
        if len(firsts) > 1:
            return i
    return None


def compare(results: list) -> dict | None:
    """SGLang's checker beside cpcheck's, over one run: whether it fired (on which ranks), what
    it said, and how long after the first divergent decision (decisions and seconds, on the
    first rank that fired); None when the checker was not on."""
    said = {r.rank: r.consensus_checker for r in results}
    said = {k: v for k, v in said.items() if v}
    if not said:
        return None
    fired = sorted(k for k, v in said.items() if v["fired"])
    out: dict[str, Any] = {
        "configured": all(v["configured"] for v in said.values()),
        "fired_ranks": fired, "events": {k: v["events"] for k, v in said.items()},
        "refused": {k: v.get("refused", 0) for k, v in said.items() if v.get("refused")},
        "stuck_ranks": sorted(k for k, v in said.items() if v["stuck_at_end"]),
        "first_divergent_decision": first_divergent_decision(results),
        "message": "", "after_decisions": None, "after_s": None}
    if fired:
        first = min(fired, key=lambda k: said[k]["fired_s"])
        v = said[first]
        out["message"] = v["message"]
        d0 = out["first_divergent_decision"]
        if d0 is not None and d0 < len(v["decided_s"]):
            out["after_decisions"] = v["decisions_at_fire"] - (d0 + 1)
            out["after_s"] = round(v["fired_s"] - v["decided_s"][d0], 4)
    return out


def line(said: dict) -> str:
    """One line on what SGLang's checker did in a run (`compare`'s summary)."""
    if not said["configured"]:
        return "not in this release (no rank_consensus_checker module)"
    ev = said["events"]
    n = f"{min(ev.values())}-{max(ev.values())}" if ev else "0"
    if not said["fired_ranks"]:
        stuck = (f"; its thread was blocked at the end of the run on ranks "
                 f"{said['stuck_ranks']} (peers queued fewer events)" if said["stuck_ranks"]
                 else "")
        return f"did not fire ({n} events per rank){stuck}"
    when = ""
    if said["after_decisions"] is not None:
        when = (f" {said['after_decisions']} decisions / {said['after_s']:.3f} s after the first "
                f"divergent decision (#{said['first_divergent_decision']})")
    return (f"fired on ranks {said['fired_ranks']}{when}: "
            f"{said['message'][:300]}")
