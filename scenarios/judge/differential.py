"""Compare one Schedule's run on the reference with its run on an SGLang release, quantity by
quantity, and name the first difference as a Finding with its own invariant name.

The cross-rank checker cannot see a reference that differs from SGLang while every rank agrees
with every other; this can. What is compared, rank by rank (each a `diff-*` invariant):

- `diff-decisions`: the scheduler's decisions (kind, request, outcome) in order; an outcome's
  words after ";" are what only one SUT reports (0.5.16+'s hit queue) and are not compared;
- `diff-host-releases` and `diff-backup-acks`: the drain's "release c" and "backup acks b" parts
  (the first differing drain names which part differs);
- `diff-outcomes`: what each request got (device / host hit, computed tokens, status);
- `diff-evictions`: which pages are on device and host after each evict op, in op order;
- `diff-keys`: the storage keys each side wrote (exactly) and looked up or read (per page);
- `diff-slots`: the slot accounting after the drain (device / host slots used, tokens the tree
  holds on each, IO still in flight);
- `diff-error`: one side's rank failed where the other's did not.

Nothing is filtered here: a known difference is taken out of the Schedule the reference runs,
in one place with the release code it comes from (scenarios/campaigns/differential.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from scenarios.core.records import RankResult
from scenarios.core.verdict import Finding, Verdict

DIFF_INVARIANTS = ("diff-error", "diff-decisions", "diff-host-releases", "diff-backup-acks",
                   "diff-outcomes", "diff-evictions", "diff-keys", "diff-slots")

#: The known differences between the reference and the releases it models: the ONE table.
#: Each is taken out in one place, named by its key there (a configuration in
#: `as_sglang_runs_it`, a comparison rule below); tests/test_differential_explore.py tests each.
KNOWN_DIFFERENCES: dict[str, str] = {
    "storage_batch_pages": (
        "SGLang's prefetch IO batch is fixed at 128 pages (0.5.11 `HiCacheController."
        "storage_batch_size`, 0.5.13+ `hicache_storage.STORAGE_BATCH_SIZE`); a Schedule's "
        "`prefetch_batch_pages` sizes only the reference's: the reference runs at 128"),
    "host_pool_pages": (
        "SGLang's host pool is larger than asked: the driver sizes it at least one page above "
        "the device pool (`HostKVCache` asserts `self.size > device_pool.size`) and "
        "`HostKVCache.__init__` aligns it up with one more page (`page_num = size // "
        "page_size + 1`; 0.5.20: `pool_host/base.py`): the reference runs with that many host "
        "pages"),
    "exists_stops_at_first_miss": (
        "SGLang's prefetch thread asks `batch_exists` for every page of a prefetch at once "
        "(`HiCacheController._storage_hit_query`, MooncakeStore / file `batch_exists`); the "
        "reference's `exists` stops at the first miss: the pages the reference looked up must "
        "be among SGLang's, with the same keys"),
}

#: Differences found and NOT closed yet: never filtered by the comparison (a run that meets
#: one fails); listed so that tests which prove the comparison's power can steer clear of them.
REMAINING_DIFFERENCES: dict[str, str] = {
    "pp_host_releases_0_5_11": (
        "seen 2026-12-08 on 0.5.11 under PP (1x1x2, the only layout it appears on: 1x2 and 2x2 "
        "agree on 100 Schedules with DP attention on and off; replay scenarios/corpus/"
        "differential/replay-diff-sglang-0.5.11-dpattn-1x1x2-0758ff672f5c.json): at the drain "
        "after a backup ack, stage 0 of the reference queues 4 host pages for release where "
        "0.5.11 queues 0 (decision #13: `release 4` vs `release 0`); not yet explained"),
    "prefetch_ack_drain_0_5_20": (
        "seen 2026-12-08 on 0.5.20 (2x2; replay scenarios/corpus/differential/"
        "replay-diff-sglang-0.5.20-dpattn-2x2-be0755e300e9.json): 0.5.19+'s prefetch-sync "
        "thread puts each agreed progress ack on `ack_prefetch_queue`, which the drain pops "
        "(`_drain_ack_prefetch`, its size in the step's MIN), so the run steps once more while "
        "a final ack is queued (decision #5: reference <nothing> vs SGLang writing_check); "
        "the reference's sync thread sets the agreed count on the operation directly. "
        "Closing it means modelling the queue (and under wait_complete the insertion from "
        "the drain that pops the final ack) with the sync thread settled before each drain"),
}

#: the reference's in-memory store prefixes every key with its run's namespace ("r" + 10 hex)
_RUN_NAMESPACE = re.compile(r"^r[0-9a-f]{10}_")
#: the same in-flight counts under each SUT's names (reference, SGLang)
_IN_FLIGHT = (("write_acks", "write_through"), ("load_acks", "load_back"),
              ("prefetches", "prefetch"), ("backups", "backup"))
_SLOTS = ("device_used", "host_used", "tree_device_tokens", "tree_host_tokens")
_DRAIN_PARTS = {"revoke": "diff-decisions", "backup acks": "diff-backup-acks",
                "release": "diff-host-releases"}


def decision_rows(r: RankResult) -> list[tuple[str, str, str]]:
    return [(d.kind, d.rid, str(d.outcome).split(";")[0].strip())
            for d in r.decisions.get("scheduler", ())]


def _drain_parts(outcome: str) -> dict[str, str]:
    """"revoke 1, backup acks 0, release 4" -> {"revoke": "1", "backup acks": "0", ...}."""
    parts = {}
    for piece in outcome.split(","):
        name, _, value = piece.strip().rpartition(" ")
        parts[name] = value
    return parts


def _decisions(a: RankResult, b: RankResult) -> Finding | None:
    x, y = decision_rows(a), decision_rows(b)
    for i in range(max(len(x), len(y))):
        u = x[i] if i < len(x) else None
        v = y[i] if i < len(y) else None
        if u == v:
            continue
        invariant = "diff-decisions"
        if u is not None and v is not None and u[0] == v[0] == "drain" and u[1] == v[1]:
            pu, pv = _drain_parts(u[2]), _drain_parts(v[2])
            invariant = next((inv for part, inv in _DRAIN_PARTS.items()
                              if pu.get(part) != pv.get(part)), invariant)
        return Finding(invariant, f"rank {a.rank}: scheduler decision #{i}: reference "
                       f"{u or '<nothing>'} vs SGLang {v or '<nothing>'}")
    return None


def _outcomes(a: RankResult, b: RankResult) -> Finding | None:
    x = {o.rid: o for o in a.outcomes}
    y = {o.rid: o for o in b.outcomes}
    for rid in sorted(set(x) | set(y)):
        if x.get(rid) != y.get(rid):
            return Finding("diff-outcomes", f"rank {a.rank}: request {rid!r}: reference "
                           f"{x.get(rid)} vs SGLang {y.get(rid)}")
    return None


def _evictions(a: RankResult, b: RankResult) -> Finding | None:
    for i, (u, v) in enumerate(zip(a.evictions, b.evictions, strict=False)):
        if u.resident is None or v.resident is None:
            continue  # a side that cannot see its pages (0.5.21+'s Rust tree core)
        if u.resident != v.resident:
            only_ref = sorted(set(u.resident) - set(v.resident))[:4]
            only_sgl = sorted(set(v.resident) - set(u.resident))[:4]
            return Finding("diff-evictions", f"rank {a.rank}: after evict op #{i} "
                           f"({u.kind}): pages resident only on the reference {only_ref}, "
                           f"only on SGLang {only_sgl} (page:D device, H host)")
    if len(a.evictions) != len(b.evictions):
        return Finding("diff-evictions", f"rank {a.rank}: {len(a.evictions)} evict ops on the "
                       f"reference vs {len(b.evictions)} on SGLang")
    return None


def _key(k: str) -> str:
    return _RUN_NAMESPACE.sub("", k)


def _page(k: str) -> str:
    """A lookup's page: the key without its k / v part (SGLang asks for both, or for k only)."""
    k = _key(k)
    return k[:-2] if k.endswith(("_k", "_v")) else k


def storage_view(r: RankResult) -> dict[str, set[str]]:
    """The keys each storage op used on this rank: written keys exactly, lookups per page."""
    view: dict[str, set[str]] = {"set": set(), "get": set(), "exists": set()}
    for call in r.storage:
        norm = _key if call.op == "set" else _page
        view.setdefault(call.op, set()).update(norm(k) for k in call.keys)
    return view


def _keys(a: RankResult, b: RankResult) -> Finding | None:
    x, y = storage_view(a), storage_view(b)
    for op in sorted(set(x) | set(y)):
        u, v = x.get(op, set()), y.get(op, set())
        if op == "exists" and u <= v:  # KNOWN_DIFFERENCES["exists_stops_at_first_miss"]
            continue
        if u != v:
            return Finding("diff-keys", f"rank {a.rank}: storage {op}: keys only the reference "
                           f"used {sorted(u - v)[:3]}, only SGLang {sorted(v - u)[:3]} "
                           f"({len(u)} vs {len(v)} keys)")
    return None


def slot_view(r: RankResult) -> dict[str, Any]:
    snap = r.snapshot
    view = {k: getattr(snap, k, None) for k in _SLOTS}
    flight = snap.in_flight if snap is not None else {}
    for ref_name, sgl_name in _IN_FLIGHT:
        view[f"in flight {ref_name}"] = flight.get(ref_name, flight.get(sgl_name))
    return view


def _slots(a: RankResult, b: RankResult) -> Finding | None:
    x, y = slot_view(a), slot_view(b)
    diff = {k: (x[k], y[k]) for k in x if x[k] != y[k]}
    if diff:
        what = ", ".join(f"{k} {u} vs {v}" for k, (u, v) in diff.items())
        return Finding("diff-slots", f"rank {a.rank}: after the drain (reference vs SGLang): "
                       f"{what}")
    return None


def _error(a: RankResult, b: RankResult) -> Finding | None:
    if (a.error is None) != (b.error is None):
        return Finding("diff-error", f"rank {a.rank}: reference "
                       f"{a.error or 'finished'} vs SGLang {b.error or 'finished'}")
    return None


#: the comparisons in the order their findings are named (the first one found is the verdict)
COMPARISONS: tuple[Callable[[RankResult, RankResult], Finding | None], ...] = (
    _error, _decisions, _outcomes, _evictions, _keys, _slots)


def compare(ref: Sequence[RankResult], sgl: Sequence[RankResult]) -> list[Finding]:
    """Every quantity's first difference (at most one per comparison, lowest rank first)."""
    by_rank = {r.rank: r for r in sgl}
    found: list[Finding] = []
    if sorted(r.rank for r in ref) != sorted(by_rank):
        return [Finding("diff-error", f"ranks {sorted(r.rank for r in ref)} on the reference "
                        f"vs {sorted(by_rank)} on SGLang")]
    for fn in COMPARISONS:
        for a in sorted(ref, key=lambda r: r.rank):
            f = fn(a, by_rank[a.rank])
            if f is not None:
                found.append(f)
                break
        if fn is _error and found:  # a failed run's other quantities say nothing more
            break
    return found


def differential_verdict(ref: Sequence[RankResult], sgl: Sequence[RankResult],
                         label: str) -> Verdict:
    """agree (the two SUTs agree on every compared quantity) or diverge on the first one."""
    found = compare(ref, sgl)
    n = len(decision_rows(sgl[0])) if sgl else 0
    if not found:
        return Verdict(True, message=f"{label}: same decisions ({n} on rank 0), keys, "
                                     "evictions, releases, backup acks and slots")
    first = found[0]
    return Verdict(False, first.invariant, f"{label}: {first.message}", list(found))
