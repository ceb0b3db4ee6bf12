"""Turn a run into a verdict: agree, diverge (confirmed by one replay) or unknown.

A run that infrastructure broke (a rank killed by the OS, a storage backend that never came
up) says nothing about the system under test: its verdict is `unknown`, with a diagnosis. A
divergence is replayed once before it is reported; one that does not reproduce is `unknown`
(flaky) and both verdicts are kept. Runner failures are classified by exception type.
"""

from __future__ import annotations

from typing import Any

from scenarios.core.errors import (
    CollectiveMismatchDied,
    CollectiveTimeout,
    RankPoolError,
    RankTimeoutError,
)
from scenarios.core.records import RankResult
from scenarios.core.schedule import Schedule
from scenarios.core.verdict import Verdict
from scenarios.judge.checker import check


def infrastructure(results: list[RankResult]) -> str | None:
    """What broke outside the system under test, from the ranks' typed errors."""
    found = [f"rank {r.rank}: {r.infrastructure}" for r in results if r.infrastructure]
    return "; ".join(found) if found else None


def run_checked(ex: Any, s: Schedule, **run_kw: Any) -> tuple[list[RankResult], Verdict]:
    """Run `s` on the SUT executor `ex` and judge it; never raises for a broken run (the
    verdict says)."""
    try:
        results = ex.run(s, **run_kw)
    except Exception as e:
        line = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if isinstance(e, CollectiveMismatchDied):  # ranks issued different collectives
            return [], Verdict(False, "collectives", str(e), [("collectives", str(e))])
        hang = isinstance(e, CollectiveTimeout | RankTimeoutError)
        if hang and getattr(ex, "hangs_are_findings", True):
            # ranks froze: a hang of the system under test (confirmed by replay like any other)
            return [], Verdict(False, "error", f"ranks did not finish: {line}",
                               [("error", f"ranks did not finish: {line}")])
        if isinstance(e, RankPoolError):
            return [], Verdict.unknown(line)  # a rank killed by the OS, a pool that never started
        raise
    broke = infrastructure(results)
    if broke:
        return results, Verdict.unknown(broke)
    judge = getattr(ex, "judge", None)
    return results, judge(s, results) if judge is not None else check(s, results)


def confirm(ex: Any, s: Schedule, first: Verdict, replays: int = 1) -> Verdict:
    """Replay a divergence (gated, deterministic) `replays` times; keep it only if it
    reproduced at least once. Replays that could not be judged count neither way."""
    if first.status != "diverge":
        return first
    again = [run_checked(ex, s, gated=True)[1] for _ in range(max(1, replays))]
    judged = [v for v in again if v.status != "unknown"]
    reproduced = sum(v.status == "diverge" for v in judged)
    record = {"first": _brief(first), "replay": _brief(next(
        (v for v in again if v.status == "diverge"), again[0])),
        "replays": len(again), "reproduced": reproduced}
    if reproduced:
        first.stats["confirmed_by_replay"] = True
        first.stats["confirmation"] = record
        return first
    if not judged:
        diagnosis = f"divergence could not be replayed: {again[0].diagnosis}"
    else:
        on = "replay" if len(judged) == 1 else f"{len(judged)} replays"
        diagnosis = (f"flaky: DIVERGE [{first.invariant}] did not reproduce on {on} "
                     f"({judged[-1].summary()})")
    v = Verdict.unknown(diagnosis, invariant=first.invariant, failures=first.failures,
                        stats={**first.stats, "confirmed_by_replay": False,
                               "confirmation": record})
    v.message = first.message
    return v


def _brief(v: Verdict) -> dict:
    return {"status": v.status, "invariant": v.invariant, "message": v.message,
            "diagnosis": v.diagnosis}
