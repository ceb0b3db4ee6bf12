"""The checker: compares per-rank results and names the first place where ranks disagree.

Invariants, each with a known-bad variant that trips it (see tests/test_variants_cp.py):
  collectives  every member of a group issued the same calls (op, shape, dtype) in order
  decisions    every rank logged the same agreed decisions, per channel
  tree         radix-tree digests equal on every rank after every scheduler decision, and
               every request got the same cached / computed split
  keys         SGLang's key naming; with DP attention CP peers share every key, without it
               (global TP rank in MHA keys) they must not
  pages        every page read from storage is what was written for that key, and device pages
               hold what the page must hold
  leaks        after the drain every slot is held by the tree and every prefetch terminated
A rank that failed (timeout, exception) is reported with what it was waiting on.
A seventh check, `oracle` (scenarios/judge/oracle.py), judges every agreed value against the protocol
itself; it reports after the six cross-rank invariants and the rank failures.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from reference.api import effective_configuration, storage_tp_rank
from scenarios.core.records import RankResult
from scenarios.core.schedule import Schedule
from scenarios.core.verdict import Finding, Verdict
from scenarios.judge.oracle import check_oracle

INVARIANTS = ("collectives", "decisions", "tree", "keys", "pages", "leaks", "oracle")
_HASH_RE = re.compile(r"([0-9a-f]{64})_(.*)$")


def first_mismatch(a: list, b: list) -> tuple[int, Any, Any] | None:
    """(index, value_a, value_b) where two logs first differ; a shorter log reads "<nothing>"."""
    for i in range(max(len(a), len(b))):
        va = a[i] if i < len(a) else "<nothing>"
        vb = b[i] if i < len(b) else "<nothing>"
        if va != vb:
            return i, va, vb
    return None


def _first_diff(seqs: dict[int, list]) -> tuple[int, int, int, Any, Any] | None:
    """(index, rank_a, rank_b, value_a, value_b) of the first position where two ranks differ."""
    ranks = sorted(seqs)
    base = ranks[0]
    best = None
    for r in ranks[1:]:
        m = first_mismatch(seqs[base], seqs[r])
        if m is not None and (best is None or m[0] < best[0]):
            best = (m[0], base, r, m[1], m[2])
    return best


def check_collectives(results: list[RankResult]) -> list[str]:
    """Per group, members' call sequences must match; the earliest divergence is listed first."""
    by_group: dict[str, dict[int, list]] = defaultdict(dict)
    order: dict[tuple[str, int], list[int]] = {}
    for res in results:
        for name, calls in res.collectives.items():
            by_group[name][res.rank] = list(calls)
            order[(name, res.rank)] = list(res.collective_order.get(name, ()))
    found = []
    for name, seqs in sorted(by_group.items()):
        members = [int(x) for x in re.findall(r"\d+", name.split("[", 1)[1])]
        for m in members:
            seqs.setdefault(m, [])
        d = _first_diff(seqs)
        if d:
            i, ra, rb, va, vb = d
            when = min((order.get((name, r), [])[i:i + 1] or [1 << 30])[0] for r in (ra, rb))
            found.append((when, f"group {name} call #{i}: rank {ra} issued '{va}', "
                                f"rank {rb} issued '{vb}'"))
    return [m for _, m in sorted(found)]


def check_decisions(results: list[RankResult]) -> list[str]:
    out = []
    channels = sorted({c for r in results for c in r.decisions})
    for ch in channels:
        # what a rank decided; its local value legitimately differs
        seqs = {r.rank: [d.decided() for d in r.decisions.get(ch, ())] for r in results}
        d = _first_diff(seqs)
        if d:
            i, ra, rb, va, vb = d
            local = {r.rank: (list(r.decisions[ch][i].local)
                              if i < len(r.decisions.get(ch, ())) else None) for r in results}
            out.append(f"channel '{ch}' decision #{i}: rank {ra} {_fmt(va)} vs rank {rb} "
                       f"{_fmt(vb)} (local values {local})")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, tuple) and len(v) == 4:  # Decision.decided()
        return f"{v[0]}({v[1]}) agreed={list(v[2])} -> {v[3]}"
    return str(v)


def check_tree(results: list[RankResult]) -> list[str]:
    out = []
    d = _first_diff({r.rank: list(r.digests) for r in results})
    if d:
        i, ra, rb, va, vb = d
        out.append(f"tree digest after scheduler decision #{i}: rank {ra} {va} vs rank {rb} {vb}")
    # what each request got out of the tree
    seqs = {r.rank: [[o.rid, o.status, o.device_hit + o.host_hit, o.computed]
                     for o in r.outcomes] for r in results}
    d = _first_diff(seqs)
    if d:
        i, ra, rb, va, vb = d
        out.append(f"request outcome #{i} [rid, status, cached, computed]: rank {ra} {va} "
                   f"vs rank {rb} {vb}")
    return out


def _dp_attention(s: Schedule) -> bool:
    return effective_configuration(s.protocol, s.dp_attention, s.variant)[1]


def key_tp_rank(s: Schedule, coords: list[int] | tuple[int, ...]) -> int:
    """The TP rank SGLang puts in this rank's MHA keys (attention-TP or global TP rank)."""
    tp, cp, _ = coords
    return storage_tp_rank(tp, s.layout_obj.tp, cp, _dp_attention(s))


def expected_suffix(s: Schedule, tp_rank: int, pp_rank: int, part: str) -> str:
    """SGLang's naming (mooncake_store): MHA `{tp}_k`, MLA `_k`; PP rank when PP > 1.
    `tp_rank` is the key TP rank (see key_tp_rank)."""
    lay = s.layout_obj
    if s.cache.mla:
        return f"{pp_rank if lay.pp > 1 else ''}_{part}"
    return f"{tp_rank}_{pp_rank}_{part}" if lay.pp > 1 else f"{tp_rank}_{part}"


#: what check_keys can find, one rule each (SGLang's own behaviour without DP attention
#: makes four of them expected there: see sut/sglang/executor.annotate)
KEY_RULES = ("keys.hash", "keys.naming", "keys.mla_backup", "keys.copies",
             "keys.cp_peers_differ", "keys.cp_peers_share")


def check_keys(s: Schedule, results: list[RankResult]) -> list[tuple[str, str]]:
    """(rule, message) for each key finding (rules in KEY_RULES)."""
    out: list[tuple[str, str]] = []
    per_rank: dict[int, dict[str, set[str]]] = {}
    dp_attention = _dp_attention(s)
    for res in results:
        _, _, pp = res.coords
        tp = key_tp_rank(s, res.coords)
        pages: dict[str, set[str]] = defaultdict(set)
        named_badly = False  # one naming message per rank is enough
        for call in res.storage:
            op = call.op
            for key in call.keys:
                m = _HASH_RE.search(key)
                if m is None:
                    out.append(("keys.hash",
                                f"rank {res.rank}: key '{key}' does not start with a page hash"))
                    continue
                suffix = m.group(2)
                pages[m.group(1)].add(suffix)
                part = suffix.rsplit("_", 1)[-1]
                want = expected_suffix(s, tp, pp, part)
                if suffix != want and not named_badly:
                    named_badly = True
                    out.append(("keys.naming",
                                f"rank {res.rank} ({op}): key suffix '{suffix}' for page "
                                f"{m.group(1)[:12]}…, SGLang names it '{want}'"))
                if s.cache.mla and tp != 0 and op == "set":
                    out.append(("keys.mla_backup",
                                f"rank {res.rank}: MLA page {m.group(1)[:12]}… written by "
                                f"TP rank {tp}; only TP rank 0 backs up"))
        per_rank[res.rank] = pages
    # what the store holds: one copy per page part (MLA) or one per key TP rank (MHA): with DP
    # attention never one per CP rank; without it the global TP rank spans CP too
    copies: dict[tuple[str, str], set[str]] = defaultdict(set)
    for res in results:
        for key in res.stored:
            m = _HASH_RE.search(key)
            if m:
                copies[(m.group(1), m.group(2).rsplit("_", 1)[-1])].add(key)
    lay = s.layout_obj
    key_tp_ranks = lay.tp if dp_attention else lay.tp * lay.cp
    want = lay.pp if s.cache.mla else key_tp_ranks * lay.pp
    for (h, part), keys in sorted(copies.items()):
        if len(keys) > want:
            out.append(("keys.copies",
                        f"the store holds {len(keys)} copies of page {h[:12]}… part {part} "
                        f"(want at most {want}: CP-split duplicates): {sorted(keys)[:4]}"))
            break
    # CP peers (same tp, pp): with DP attention they name every shared page identically;
    # without it their MHA keys carry different global TP ranks, so they must differ
    must_share = dp_attention or s.cache.mla
    for res in results:
        r = res.rank
        for peer in lay.attn_cp_group(r):
            if peer <= r or peer not in per_rank:
                continue
            for h in sorted(set(per_rank[r]) & set(per_rank[peer])):
                same = per_rank[r][h] == per_rank[peer][h]
                if must_share and not same:
                    out.append(("keys.cp_peers_differ",
                                f"CP peers {r} and {peer} use different keys for page "
                                f"{h[:12]}…: {sorted(per_rank[r][h])} vs "
                                f"{sorted(per_rank[peer][h])}"))
                    break
                if not must_share and per_rank[r][h] & per_rank[peer][h]:
                    out.append(("keys.cp_peers_share",
                                f"CP peers {r} and {peer} share key suffixes "
                                f"{sorted(per_rank[r][h] & per_rank[peer][h])} for page "
                                f"{h[:12]}… without DP attention (SGLang keys MHA pages by "
                                f"the global TP rank)"))
                    break
    return out[:20]


def check_pages(results: list[RankResult]) -> list[str]:
    written: dict[str, str] = {}
    out = []
    for res in results:
        for call in res.storage:
            if call.op == "set":
                for k, good, c in zip(call.keys, call.ok, call.checksums, strict=False):
                    if good and written.setdefault(k, c) != c:
                        out.append(f"key {k[:24]}… written with different bytes by different ranks")
    for res in results:
        for call in res.storage:
            if call.op != "get":
                continue
            for k, good, c in zip(call.keys, call.ok, call.checksums, strict=False):
                if good and k in written and written[k] != c:
                    out.append(f"rank {res.rank}: read of {k[:24]}… returned bytes "
                               f"{c} but {written[k]} was written")
        for o in res.outcomes:
            if o.bad_pages:
                out.append(f"rank {res.rank}: request {o.rid} found wrong KV on the "
                           f"device in pages {list(o.bad_pages)}")
    return out[:20]


def check_leaks(results: list[RankResult]) -> list[str]:
    out = []
    for res in results:
        snap = res.snapshot
        if snap is None:
            continue
        r = res.rank
        if snap.busy:
            out.append(f"rank {r}: still busy after the drain: {snap.in_flight}")
        if snap.device_used != snap.tree_device_tokens:
            out.append(f"rank {r}: {snap.device_used} device slots in use, the tree holds "
                       f"{snap.tree_device_tokens}")
        if snap.host_used != snap.tree_host_tokens:
            out.append(f"rank {r}: {snap.host_used} host slots in use, the tree holds "
                       f"{snap.tree_host_tokens}")
    return out


def check(s: Schedule, results: list[RankResult]) -> Verdict:
    results = sorted(results, key=lambda r: r.rank)
    stats = {
        "ranks": len(results),
        "decisions": sum(r.decision_count() for r in results),
        "collectives": sum(len(v) for r in results for v in r.collectives.values()),
        "storage_calls": sum(len(r.storage) for r in results),
        "requests": len(results[0].outcomes) if results else 0,
        "wall_s": max((r.wall_s for r in results), default=0.0),
    }
    failures: list[tuple[str, str]] = []
    for name, fn in (
        ("collectives", lambda: check_collectives(results)),
        ("decisions", lambda: check_decisions(results)),
        ("tree", lambda: check_tree(results)),
        ("keys", lambda: check_keys(s, results)),
        ("pages", lambda: check_pages(results)),
        ("leaks", lambda: check_leaks(results)),
    ):
        # check_keys names its rule with each finding; the others are one rule each
        failures += [Finding(name, m[1], m[0]) if isinstance(m, tuple) else Finding(name, m)
                     for m in fn()]
    # the tree may diverge before any logged decision does (a decision agreed, then acted on
    # with a local value): report whichever happened first on the scheduler's timeline
    tree_at = _first_diff({r.rank: list(r.digests) for r in results})
    sched_at = _first_diff({r.rank: [d.decided() for d in r.decisions.get("scheduler", ())]
                            for r in results})
    if tree_at and (sched_at is None or tree_at[0] < sched_at[0]):
        failures.sort(key=lambda f: f[0] != "tree")
    errors = [r for r in results if r.error is not None]
    # a rank that failed on its own (not by timing out on a peer) is the root cause: name it
    # before the collective mismatches it caused. The kind comes from the exception's type.
    causes = [Finding("error", _describe_error(r)) for r in errors if not r.error.waited]
    failures = causes + failures + [Finding("error", _describe_error(r)) for r in errors
                                    if r.error.waited]
    failures += [Finding("oracle", m, f"oracle.{rule}") for rule, m in check_oracle(s, results)]
    if not failures:
        return Verdict(True, stats=stats, message=f"{stats['ranks']} ranks agree on "
                       f"{stats['decisions']} decisions")
    inv, msg = failures[0]
    return Verdict(False, inv, msg, failures, stats)


def _describe_error(res: RankResult) -> str:
    waits = {**res.pending_collectives, **res.waiting_on}
    what = "; ".join(f"{t}: {w}" for t, w in waits.items()) or "nothing pending"
    return (f"rank {res.rank} failed after {res.ops_done} ops: {res.error} [{res.error.kind.value}]"
            f" (waiting on: {what})")
