"""Turn a run into a verdict: agree, diverge (confirmed by one replay) or unknown.

A run that infrastructure broke (a rank killed by the OS, a storage backend that never came
up) says nothing about the system under test: its verdict is `unknown`, with a diagnosis. A
divergence is replayed once before it is reported; one that does not reproduce is `unknown`
(flaky) and both verdicts are kept. Runner failures are classified by exception type.
"""

from __future__ import annotations

from typing import Any

from scenarios.core.contract import is_a
from scenarios.core.records import RankResult
from scenarios.core.schedule import Schedule
from scenarios.core.verdict import Verdict
from scenarios.judge.checker import check


def infrastructure(results: list[RankResult]) -> str | None:
    """What broke outside the system under test, from the ranks' typed errors."""
    found = [f"rank {r.rank}: {r.infrastructure}" for r in results if r.infrastructure]
    return "; ".join(found) if found else None


def run_checked(ex: Any, s: Schedule, **run_kw: Any) -> tuple[list[RankResult], Verdict]:
    """Run `s` on `ex` and judge it; never raises for a broken run (the verdict says)."""
    try:
        results = ex.run(s, **run_kw)
    except Exception as e:
        line = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if is_a(e, "scenarios.runner.inprocess:CollectiveTimeout",
               "scenarios.runner.torchrun_pool:RankTimeoutError"):
            # ranks froze: a hang of the system under test (confirmed by replay like any other)
            return [], Verdict(False, "error", f"ranks did not finish: {line}",
                               [("error", f"ranks did not finish: {line}")])
        if is_a(e, "scenarios.runner.torchrun_pool:RankPoolError"):
            return [], Verdict.unknown(line)  # a rank killed by the OS, a pool that never started
        raise
    broke = infrastructure(results)
    if broke:
        return results, Verdict.unknown(broke)
    return results, check(s, results)


def confirm(ex: Any, s: Schedule, first: Verdict) -> Verdict:
    """Replay a divergence once (gated, deterministic); keep it only if it reproduces."""
    if first.status != "diverge":
        return first
    _, again = run_checked(ex, s, gated=True)
    record = {"first": _brief(first), "replay": _brief(again)}
    if again.status == "diverge":
        first.stats["confirmed_by_replay"] = True
        first.stats["confirmation"] = record
        return first
    if again.status == "unknown":
        diagnosis = f"divergence could not be replayed: {again.diagnosis}"
    else:
        diagnosis = (f"flaky: DIVERGE [{first.invariant}] did not reproduce on replay "
                     f"({again.summary()})")
    v = Verdict.unknown(diagnosis, invariant=first.invariant, failures=first.failures,
                        stats={**first.stats, "confirmed_by_replay": False,
                               "confirmation": record})
    v.message = first.message
    return v


def _brief(v: Verdict) -> dict:
    return {"status": v.status, "invariant": v.invariant, "message": v.message,
            "diagnosis": v.diagnosis}
