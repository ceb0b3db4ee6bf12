"""Outcome coverage: which outcome each decision point actually reached, counted per run.

A checker only judges the paths a workload reaches. This counts, from the same per-rank logs the
checker reads, how every prefetch ended and what the ack / drain / load / eviction points saw,
so a soak report, an explore summary and a test can say which classes were never exercised.

Prefetch classes (one per prefetch, from the agreed values, identical on every rank):
  revoked          agreed hits below the threshold
  aborted          the request was aborted while its prefetch ran
  complete         storage held every requested page, and all of them entered the tree
  partial          storage held a prefix of the requested pages; all of those entered the tree
  terminated       the stop policy stopped it with IO outstanding on some rank, before every
                   agreed page was in (best_effort, or timeout after its deadline)
  storage_error    IO finished on every rank, but a batch failed: fewer pages than agreed hits
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from reference.api import AckEffect, HitsEffect, ProgressSeen
from scenarios.core.records import RankResult

PREFETCH_CLASSES = ("revoked", "aborted", "complete", "partial", "terminated", "storage_error")

#: Policy predicates of the reference's decisions, each reached just below, at and just above
#: its threshold (`boundaries` counts them per run; tests/test_coverage.py asserts the `ci`
#: profile reaches every one), and every storage call kind failing while pages are behind it.
#:   threshold   prefetch_thread_func: revoke iff agreed hit pages * page < prefetch_threshold
#:               (clamped to one page); agreed hits one page below / at / one page above it
#:   deadline    can_terminate_prefetch under `timeout`, IO still running: terminate iff
#:               elapsed ticks > prefetch_timeout; checked one tick before / at / one tick after
#:   batch       num_batches = ceil(hits / batch pages) with batch pages > 1: hits fill whole
#:               batches, leave one page over, or one page short of a whole last batch
#:   progress    the io_done predicate completed == hit tokens: one batch short / every page in
#:   fault       a storage call failing with pages behind it: a hit query (exists) for pages
#:               written in this run (the query records a failure), a get of agreed hits, a
#:               set of a backup
BOUNDARY_CLASSES = (
    "threshold: hits one page below", "threshold: hits at", "threshold: hits one page above",
    "deadline: one tick before", "deadline: at", "deadline: one tick after",
    "batch: whole batches", "batch: one page over", "batch: one page short",
    "progress: one batch short", "progress: every page in",
    "fault: exists on stored pages", "fault: get of agreed hits", "fault: set of a backup",
)


def _base(results: list[RankResult]) -> RankResult | None:
    ok = [r for r in results if r.error is None]
    return min(ok, key=lambda r: r.rank) if ok else None


def prefetch_classes(s: Any, results: list[RankResult]) -> dict[str, str]:
    """rid -> prefetch class, for every prefetch whose end the logs show."""
    base = _base(results)
    if base is None:
        return {}
    page = s.cache.page_size
    dec = base.decisions
    effs = base.effects.get("prefetch", ())
    hits = {e.rid: (e.outcome, e.agreed, effs[i] if i < len(effs) else ())
            for i, e in enumerate(dec.get("prefetch", ())) if e.kind == "prefetch_hits"}
    sched = dec.get("scheduler", ())
    done = {e.rid: int(e.agreed[0]) for e in sched if e.kind == "prefetch_done" and e.agreed}
    term_at = {e.rid: i for i, e in enumerate(sched)
               if e.kind == "can_terminate" and e.outcome == "terminate"}
    aborted = {o.rid for o in s.ops if o.kind == "abort"}
    out: dict[str, str] = {}
    for rid, (outcome, agreed, eff) in hits.items():
        requested = eff.requested_pages if isinstance(eff, HitsEffect) else None
        if outcome == "revoke":
            out[rid] = "revoked"
            continue
        if rid not in done:
            continue  # never ended in the logs (a failed run)
        hit_tokens = int(agreed[0]) * page
        if rid not in term_at and rid in aborted:
            out[rid] = "aborted"  # stopped by the abort, not by a can_terminate
        elif done[rid] >= hit_tokens:
            whole = requested is not None and int(agreed[0]) >= requested
            out[rid] = "complete" if whole else "partial"
        elif rid not in term_at or _io_outstanding(results, term_at[rid]):
            out[rid] = "terminated"
        else:
            out[rid] = "storage_error"
    return out


def boundaries(s: Any, results: list[RankResult]) -> Counter:
    """Which BOUNDARY_CLASSES this run reached (threshold, batch and progress classes from the
    lowest healthy rank's agreed values; deadlines and faults from every rank)."""
    out: Counter = Counter()
    base = _base(results)
    if base is None:
        return out
    c = s.cache
    page, bp = c.page_size, c.prefetch_batch_pages
    threshold = max(c.prefetch_threshold, page)
    for e in base.decisions.get("prefetch", ()):
        if e.kind != "prefetch_hits" or not e.agreed:
            continue
        hits = int(e.agreed[0])
        gap = hits * page - threshold
        if gap in (-page, 0, page):
            out[("threshold: hits one page below", "threshold: hits at",
                 "threshold: hits one page above")[gap // page + 1]] += 1
        if hits * page >= threshold and hits and bp > 1:
            over = hits % bp
            if over == 0:
                out["batch: whole batches"] += 1
            elif over == 1:
                out["batch: one page over"] += 1
            if over == bp - 1 and bp > 2:
                out["batch: one page short"] += 1
    stored = {k for r in results for call in r.storage if call.op == "set"
              for k, ok in zip(call.keys, call.ok, strict=False) if ok}
    for r in results:
        for e, eff in zip(r.decisions.get("scheduler", ()), r.effects.get("scheduler", ()),
                          strict=False):
            if e.kind != "can_terminate" or not isinstance(eff, ProgressSeen):
                continue
            if not eff.queried or eff.revoked or not eff.hit_tokens:
                continue
            step = bp * page
            if eff.completed == eff.hit_tokens:
                out["progress: every page in"] += 1
            elif eff.hit_tokens - step <= eff.completed < eff.hit_tokens and not eff.io_done:
                out["progress: one batch short"] += 1
            if (c.prefetch_stop_policy == "timeout" and not eff.io_done
                    and eff.completed < eff.hit_tokens):
                d = float(eff.elapsed) - c.prefetch_timeout_ticks
                if d in (-1.0, 0.0, 1.0):
                    out[("deadline: one tick before", "deadline: at",
                         "deadline: one tick after")[int(d) + 1]] += 1
        for call in r.storage:
            if not call.ok or all(call.ok):
                continue
            if call.op == "exists" and stored.intersection(call.keys):
                out["fault: exists on stored pages"] += 1
            elif call.op == "get":
                out["fault: get of agreed hits"] += 1
            elif call.op == "set":
                out["fault: set of a backup"] += 1
    return out


def _io_outstanding(results: list[RankResult], index: int) -> bool:
    """At scheduler decision #index (a can_terminate), did any rank still have IO running?"""
    for r in results:
        effs = r.effects.get("scheduler", ())
        seen = effs[index] if index < len(effs) else ()
        if isinstance(seen, ProgressSeen) and seen.outstanding:
            return True
    return False


def _ack_class(popped: int, queued: int) -> str | None:
    if queued <= 0:
        return None
    return "none" if popped == 0 else "all" if popped >= queued else "some"


def count(s: Any, results: list[RankResult], faults: dict[str, int] | None = None) -> dict[str, Counter]:
    """Per decision point, a Counter of the outcomes this run reached."""
    cov: dict[str, Counter] = defaultdict(Counter)
    classes = prefetch_classes(s, results)
    cov["prefetch"].update(classes.values())
    base = _base(results)
    if base is None:
        return dict(cov)
    sched = base.decisions.get("scheduler", ())
    effs = base.effects.get("scheduler", ())
    for i, e in enumerate(sched):
        eff = effs[i] if i < len(effs) else ()
        if isinstance(eff, AckEffect):
            c = _ack_class(eff.popped, eff.queued)
            if c:
                cov["write_acks" if e.kind == "writing_check" else "load_acks"][c] += 1
        elif e.kind == "drain" and e.agreed:
            for name, n in zip(("revoke", "backup_ack", "host_release"), e.agreed, strict=False):
                if n:
                    cov["drain"][name] += 1
    for o in base.outcomes:
        if o.host_hit:
            cov["load_back"]["host hit loaded"] += 1
    for ev in base.evictions:
        cov["eviction"][f"{ev.kind} {'with IO/requests in flight' if ev.busy else 'idle'}"] += 1
    for r in results:
        for call in r.storage:
            if call.ok and not all(call.ok):
                cov["storage"][f"{call.op} failed"] += 1
    cov["boundary"].update(boundaries(s, results))
    if faults:
        for kind, n in faults.items():
            if n:
                cov["faults"][kind] += n
        if faults.get("master_restart") and classes:
            cov["faults"]["master_restart during a run with prefetches"] += 1
    return dict(cov)


class Coverage:
    """Counts summed over runs."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.runs = 0

    def add(self, s: Any, results: list[RankResult], faults: dict[str, int] | None = None) -> None:
        self.runs += 1
        for point, c in count(s, results, faults).items():
            self.counts[point].update(c)

    def prefetch_shares(self) -> dict[str, float]:
        c = self.counts.get("prefetch", Counter())
        total = sum(c.values())
        return {k: (c.get(k, 0) / total if total else 0.0) for k in PREFETCH_CLASSES}

    def lagging(self, share: float, min_total: int = 20) -> list[str]:
        """Prefetch classes below `share` of the prefetches so far (none before `min_total`)."""
        total = sum(self.counts.get("prefetch", Counter()).values())
        if total < min_total:
            return []
        return [k for k, v in self.prefetch_shares().items() if v < share]

    def missing(self) -> list[str]:
        c = self.counts.get("prefetch", Counter())
        return [k for k in PREFETCH_CLASSES if not c.get(k)]

    def missing_boundaries(self) -> list[str]:
        c = self.counts.get("boundary", Counter())
        return [k for k in BOUNDARY_CLASSES if not c.get(k)]

    def to_dict(self) -> dict:
        d: dict[str, Any] = {p: dict(sorted(c.items())) for p, c in sorted(self.counts.items())}
        d["prefetch_shares"] = {k: round(v, 3) for k, v in self.prefetch_shares().items()}
        return d

    def table(self) -> str:
        """A Markdown table: point, outcome, count, share of that point."""
        lines = ["| point | outcome | count | share |", "|---|---|---|---|"]
        for point, c in sorted(self.counts.items()):
            total = sum(c.values())
            keys = (list(PREFETCH_CLASSES) if point == "prefetch" else
                    list(BOUNDARY_CLASSES) if point == "boundary" else sorted(c))
            for k in keys:
                n = c.get(k, 0)
                lines.append(f"| {point} | {k} | {n} | {n / total:.0%} |" if total
                             else f"| {point} | {k} | 0 | - |")
        return "\n".join(lines)

    def plot(self, path: Any) -> None:
        """One bar row per decision point (the soak's coverage.png), written atomically."""
        from scenarios.store.report import new_figure, save_figure

        points = sorted(self.counts)
        fig = new_figure(7, 1.6 * max(len(points), 1))
        axes = fig.subplots(len(points) or 1, 1, squeeze=False)
        for ax, point in zip(axes[:, 0], points, strict=False):
            c = self.counts[point]
            keys = list(PREFETCH_CLASSES) if point == "prefetch" else sorted(c)
            ax.barh(keys, [c.get(k, 0) for k in keys])
            ax.set_title(point, fontsize=9, loc="left")
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        save_figure(fig, path)
