"""The protocol oracle: judges each agreed value against the protocol, not only against peers.

The cross-rank invariants in checker.py pass whenever every rank agrees, even on a wrong value
(a reduce with the wrong operator, a threshold applied to the wrong count, a stop policy that
stops early everywhere). This module recomputes, from the per-rank logs alone, what the protocol
(docs/design/protocol-by-release.md; the rules below are docs/design/oracle.md) says each
agreed value must be. It is written from those documents and imports nothing from `reference/`.

Rules (each violation names the rule, the decision, the ranks, the locals, expected and actual):
  reduce        the agreed value equals the reduction of the members' local values, reduced
                over the profile's sync groups in order: MIN for hits, progress, write / load
                acks and the drained queue sizes; MAX for can_terminate [1 - can, terminated].
                sglang-0.5.10 reduces over the cache's TP group only (the attention-TP group
                with DP attention, the stage's full TP group without); 0.5.11+ over attention
                CP then attention TP (the cache's TP group if both are single ranks); 0.5.13
                forwards PP stage 0's value for `writing_check` / `loading_check` only (a
                later stage's agreed ack count is its stage-0 counterpart's, decision by
                decision), every other agreement stays inside the stage as in 0.5.11; 0.5.20
                adds the PP group to every reduce as the reference's profile models it; a
                0.5.20+ release itself (an SGLang run) reduces the scheduler's checks
                (write / load acks, the drain, can_terminate) on PP stage 0 and forwards
                the value to the later stages, and puts PP in the controller's hit and
                completion reduces. Before
                0.5.13 `loading_check` is local: its agreed value is the local one; so is
                `writing_check` under write-back eviction (it waits for every write, no
                collective). best_effort `can_terminate` issues no collective (checked by
                the best_effort rule). `writing_check` logs nothing when nothing is in flight
                up to 0.5.13 (`writing_check_early_return`); from 0.5.14 it logs every step.
  acks          the acks popped equal the agreed count (writing_check, loading_check, and the
                revoke / backup-ack / host-release queues of drain_storage_control_queues)
  revoke        a prefetch is revoked iff the agreed hit pages x page size are below the
                threshold (clamped to one page to 0.5.17; as configured from 0.5.18, so at
                threshold 0 nothing is revoked); otherwise exactly the agreed pages are fetched
  insert        the tokens a prefetch inserts equal its agreed completed count (0 for a revoked
                prefetch or an aborted request), and the count the scheduler acts on is the
                final progress ack's agreed count where per-batch acks exist (0.5.20)
  terminate     can_terminate terminates iff the agreed [1 - can, terminated] says every rank
                can stop or some rank already terminated, both as logged and as acted on (a
                prefetch that stops right after an agreed "wait" violates it)
  wait_complete with wait_complete, no termination while a member rank still has IO
                outstanding (hit query pending, or pages missing before its final ack), unless
                a member already terminated (revoked)
  timeout       with timeout, a member with IO outstanding at termination had passed its own
                deadline (prefetch_timeout_ticks), unless a member already terminated
  best_effort   with best_effort, can_terminate always terminates and no rank reports "cannot"
                (every rank logs what its IO had done, so wait_complete / timeout can judge a
                run whose policy was read as best_effort)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from reference.api import AckEffect, DrainEffect, Effect, HitsEffect, ProgressSeen
from scenarios.core.layout import Layout
from scenarios.core.records import Decision, RankResult
from scenarios.core.suts import is_sglang

DEFAULT_PROTOCOL = "sglang-0.5.20"
#: seconds per prefetch_timeout_tick when free-running (gated runs count pacer ticks);
#: must match scenarios/sut/reference_rank.cache_config (tests/test_oracle.py checks it)
FREE_RUNNING_TICK_S = 0.05
RULES = ("reduce", "acks", "revoke", "insert", "terminate", "wait_complete", "timeout",
         "best_effort")
MAX_VIOLATIONS = 20

#: decision kinds whose agreed value is a reduction, and the operator
REDUCE_OP = {"prefetch_hits": "min", "prefetch_progress": "min", "prefetch_final": "min",
             "writing_check": "min", "loading_check": "min", "drain": "min",
             "can_terminate": "max", "prefetch_done": "min"}

Stage = Callable[[int], tuple[int, ...]]

#: the agreements 0.5.13 forwards from PP stage 0 (its `_all_reduce`); the rest of its
#: agreements reduce over the stage's attention groups only (`_all_reduce_attn_groups`)
FORWARDED_KINDS = ("writing_check", "loading_check")
#: the scheduler's agreements that 0.5.20+'s wheels reduce on PP stage 0 and forward down the
#: pipeline (`_all_reduce`: `_all_reduce_attn_groups` on stage 0, then `_pp_sync`'s recv /
#: isend); the controller's hit and completion agreements put the PP group in the reduce
STAGE0_FORWARDED_KINDS = ("writing_check", "loading_check", "drain", "can_terminate")


#: variant names that stand for a whole configuration (the README's variant table): a run
#: with one follows that protocol and DP-attention setting whatever the Schedule says
ALIASES = {"tp_only_sync": ("sglang-0.5.10", True)}


def protocol_of(s: Any) -> str:
    """The protocol the run followed: a release's own (SGLang as the SUT), else the alias's or
    the Schedule's profile."""
    from scenarios.core.releases import profile_of_sut

    release = profile_of_sut(getattr(s, "sut", "reference") or "reference")
    if release is not None:
        return release
    alias = ALIASES.get(getattr(s, "variant", ""))
    if alias is not None:
        return alias[0]
    return getattr(s, "protocol", DEFAULT_PROTOCOL) or DEFAULT_PROTOCOL


def dp_attention_of(s: Any) -> bool:
    alias = ALIASES.get(getattr(s, "variant", ""))
    if str(getattr(s, "sut", "") or "").startswith("sglang=="):
        alias = None  # SGLang ran the Schedule's own setting: a reference variant means nothing
    return alias[1] if alias is not None else bool(getattr(s, "dp_attention", True))


def stage0_rank(lay: Layout, r: int) -> int:
    """The rank at rank `r`'s attention coordinates on PP stage 0: where a forward starts."""
    return lay.rank_of(*lay.coords(r)[:2], 0)


def version_of(protocol: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", protocol)
    return tuple(int(n) for n in nums[:3]) if len(nums) >= 3 else (0, 5, 20)


def sync_stages(s: Any) -> list[tuple[str, Stage]]:
    """The profile's reduction stages, in order: (name, rank -> that rank's group)."""
    lay: Layout = s.layout_obj
    ver = version_of(protocol_of(s))
    dp = dp_attention_of(s)
    cache_tp: Stage = lay.attn_tp_group if dp else lay.tp_group
    stages: list[tuple[str, Stage]]
    if ver < (0, 5, 11):
        stages = [("tp" if not dp else "attn_tp", cache_tp)]
    else:
        stages = [(n, f) for n, f, size in (("attn_cp", lay.attn_cp_group, lay.cp),
                                            ("attn_tp", lay.attn_tp_group, lay.tp)) if size > 1]
        if not stages:
            stages = [("tp", cache_tp)]
        if lay.pp > 1 and ver >= (0, 5, 20):
            stages.append(("pp", lay.pp_group))
        elif lay.pp > 1 and ver >= (0, 5, 13):
            stages.append(("pp_forward", lambda r: (stage0_rank(lay, r),)))
    return [(n, f) for n, f in stages if len(f(0)) > 1 or n == "pp_forward"]


def _components(world: int, stages: list[tuple[str, Stage]]) -> list[tuple[int, ...]]:
    parent = list(range(world))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for name, f in stages:
        for r in range(world):
            for m in (f(r) if name != "pp_forward" else f(r) + (r,)):
                parent[find(m)] = find(r)
    comps: dict[int, list[int]] = {}
    for r in range(world):
        comps.setdefault(find(r), []).append(r)
    return [tuple(v) for v in comps.values()]


def reduce_over(stages: list[tuple[str, Stage]], comp: tuple[int, ...],
                locals_: dict[int, list[int]], op: str) -> dict[int, tuple[int, ...]]:
    """What each rank of `comp` must hold after reducing `locals_` stage by stage."""
    pick = min if op == "min" else max
    vals = {r: tuple(locals_[r]) for r in comp}
    for name, f in stages:
        if name == "pp_forward":
            vals = {r: vals[f(r)[0]] for r in comp}
        else:
            vals = {r: tuple(pick(col) for col in zip(*(vals[m] for m in f(r)), strict=True))
                    for r in comp}
    return vals


class Oracle:
    def __init__(self, s: Any, results: list[RankResult]) -> None:
        self.s = s
        self.results = {r.rank: r for r in results}
        self.protocol = protocol_of(s)
        self.ver = version_of(self.protocol)
        self.stages = sync_stages(s)
        #: 0.5.13 under PP: every agreement is checked inside its stage; the forwarded ack
        #: counts of later stages are checked against stage 0 by check_forwarded_acks
        self.forward = next((f for n, f in self.stages if n == "pp_forward"), None)
        self.stage_stages = [(n, f) for n, f in self.stages if n != "pp_forward"]
        self.world = s.layout_obj.world_size
        self.comps = _components(self.world, self.stage_stages)
        #: 0.5.20+ run by the release under PP: the scheduler's agreements are stage 0's,
        #: forwarded (the reference's `sglang-0.5.20` reduces them over PP instead)
        lay = s.layout_obj
        self.stage0_forwards = (lay.pp > 1 and self.ver >= (0, 5, 20)
                                and is_sglang(getattr(s, "sut", None)))
        self.page = s.cache.page_size
        self.policy = s.cache.prefetch_stop_policy
        gated = not any(r.recorded is not None for r in results)
        self.timeout_s = s.cache.prefetch_timeout_ticks * (1.0 if gated else FREE_RUNNING_TICK_S)
        self.aborted = {o.rid for o in s.ops if o.kind == "abort"}
        self.out: list[tuple[str, str]] = []

    def fail(self, rule: str, msg: str) -> None:
        if len(self.out) < MAX_VIOLATIONS:
            self.out.append((rule, f"rule '{rule}': {msg}"))

    def _entries(self, rank: int, ch: str
                 ) -> tuple[tuple[Decision, ...], tuple[Effect | tuple[()], ...]]:
        res = self.results.get(rank)
        if res is None:
            return (), ()
        return res.decisions.get(ch, ()), res.effects.get(ch, ())

    def _final_agreed(self, rank: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self._entries(rank, "prefetch_sync")[0]:
            if d.kind == "prefetch_final" and d.agreed:
                out[d.rid] = int(d.agreed[0])
        return out

    # -- the group rules -------------------------------------------------------------------
    def check_agreements(self) -> None:
        channels = sorted({c for r in self.results.values() for c in r.decisions})
        finals = {r: self._final_agreed(r) for r in self.results}
        for comp in self.comps:
            if any(r not in self.results for r in comp):
                continue
            for ch in channels:
                rows = {r: self._entries(r, ch) for r in comp}
                n = min(len(rows[r][0]) for r in comp)
                for i in range(n):
                    ents = {r: rows[r][0][i] for r in comp}
                    kinds = {(e.kind, e.rid) for e in ents.values()}
                    if len(kinds) != 1:
                        break  # the logs themselves diverge here: the cross-rank checks say so
                    kind, rid = next(iter(kinds))
                    effs = {r: (rows[r][1][i] if i < len(rows[r][1]) else ()) for r in comp}
                    self._one(ch, i, kind, rid, ents, effs, comp, finals)

    def _one(self, ch: str, i: int, kind: str, rid: str, ents: dict[int, Decision],
             effs: dict[int, Effect | tuple[()]], comp: tuple[int, ...],
             finals: dict[int, dict]) -> None:
        where = f"channel '{ch}' decision #{i} {kind}" + (f"({rid})" if rid else "")
        if any(v is None for e in ents.values() for v in (*e.local, *e.agreed)):
            return  # a value this SUT does not expose (SGLang): nothing to judge here
        locals_ = {r: [int(v) for v in e.local] for r, e in ents.items()}
        agreed = {r: [int(v) for v in e.agreed] for r, e in ents.items()}
        op = REDUCE_OP.get(kind)
        skip_reduce = (op is None or (kind == "can_terminate" and self.policy == "best_effort")
                       or (kind == "prefetch_done" and any(rid in finals.get(r, {}) for r in comp))
                       or len({len(v) for v in locals_.values()}) != 1)
        local_only = ("loading_check" if kind == "loading_check" and self.ver < (0, 5, 13)
                      else "write-back writing_check" if kind == "writing_check"
                      and all("write-back" in str(e.outcome) for e in ents.values()) else "")
        if local_only:  # no collective: each rank acts on its own count
            for r in comp:
                if agreed[r] != locals_[r]:
                    self.fail("reduce", f"{where} on rank {r}: {self.protocol} takes {local_only} "
                              f"locally; local {locals_[r]}, expected {locals_[r]}, actual "
                              f"{agreed[r]}")
        elif skip_reduce or (self.forward is not None and kind in FORWARDED_KINDS
                             and self.forward(comp[0])[0] != comp[0]):
            pass  # a later stage's forwarded ack count: check_forwarded_acks judges it
        else:
            forwarded = self.stage0_forwards and kind in STAGE0_FORWARDED_KINDS
            stages = ([(n, f) for n, f in self.stage_stages if n != "pp"] if forwarded
                      else self.stage_stages)
            want = reduce_over(stages, comp, locals_, op)
            if forwarded:  # every stage takes its stage-0 rank's value
                lay = self.s.layout_obj
                want = {r: want[stage0_rank(lay, r)] for r in comp}
            bad = [r for r in comp if tuple(agreed[r]) != want[r]]
            if bad:
                groups = [list(f(bad[0])) for _n, f in stages]
                fwd = ", on PP stage 0, forwarded" if forwarded else ""
                self.fail("reduce", f"{where} on ranks {bad}: locals {locals_} reduced with "
                          f"{op.upper()} over {groups}{fwd} ({self.protocol}) expects "
                          f"{list(want[bad[0]])}, actual {agreed[bad[0]]}")
        for r in comp:
            self._consequences(where, kind, r, ents, effs, locals_, agreed, comp)

    def _consequences(self, where: str, kind: str, r: int, ents: dict, effs: dict,
                      locals_: dict, agreed: dict, comp: tuple[int, ...]) -> None:
        eff = effs.get(r) or ()
        ag = agreed[r]
        outcome = str(ents[r].outcome)
        if isinstance(eff, AckEffect | DrainEffect):
            popped = list(eff.popped_per_value)
            if popped != ag:
                self.fail("acks", f"{where} on rank {r}: agreed {ag}, so pop exactly that many; "
                          f"locals {locals_}, expected {ag} popped, actual {popped}")
        elif isinstance(eff, HitsEffect) and ag:
            thr = self.s.cache.prefetch_threshold  # 0.5.18+: the cache's, as configured
            if self.ver < (0, 5, 18):  # the controller's, clamped to one page
                thr = max(thr, self.page)
            revoked = bool(eff.revoked)
            expect = ag[0] * self.page < thr
            if revoked != expect:
                self.fail("revoke", f"{where} on rank {r}: agreed {ag[0]} pages x {self.page} vs "
                          f"threshold {thr} tokens; locals {locals_}, expected "
                          f"{'revoke' if expect else 'fetch'}, actual {outcome}")
            elif not revoked:
                pages = eff.hit_pages
                if pages != ag[0]:
                    self.fail("revoke", f"{where} on rank {r}: locals {locals_}, expected fetch "
                              f"of {ag[0]} agreed pages, actual {pages}")
        elif kind == "can_terminate" and len(ag) == 2:
            self._termination(where, r, ag, outcome, locals_, effs, comp)

    def _termination(self, where: str, r: int, ag: list[int], outcome: str, locals_: dict,
                     effs: dict[int, Effect | tuple[()]], comp: tuple[int, ...]) -> None:
        decided = outcome == "terminate"
        if decided != (ag[0] == 0 or ag[1] == 1):
            self.fail("terminate", f"{where} on rank {r}: agreed [1-can, terminated]={ag}, "
                      f"locals {locals_}, expected {'terminate' if not decided else 'wait'}, "
                      f"actual {outcome}")
        if self.policy == "best_effort":
            if not decided or locals_[r][0] != 0:
                self.fail("best_effort", f"{where} on rank {r}: best_effort always terminates "
                          f"with can=1; locals {locals_}, expected terminate, actual {outcome}")
            return
        if not decided or r != min(comp) or any(locals_[m][1] for m in comp):
            return  # one report per agreement; a terminated (revoked) member may stop everyone
        for m in comp:
            e = effs.get(m)
            if not isinstance(e, ProgressSeen) or not e.outstanding:
                continue
            if self.policy == "wait_complete":
                self.fail("wait_complete", f"{where}: terminated while rank {m} had IO "
                          f"outstanding (queried={bool(e.queried)}, {e.completed} of "
                          f"{e.hit_tokens} tokens, final ack sent={bool(e.io_done)}); locals "
                          f"{locals_}, expected wait, actual {outcome}")
            elif self.policy == "timeout" and float(e.elapsed) <= self.timeout_s:
                self.fail("timeout", f"{where}: terminated while rank {m} had IO outstanding "
                          f"({e.completed} of {e.hit_tokens} tokens) {float(e.elapsed):g} into "
                          f"a {self.timeout_s:g} deadline; locals {locals_}, expected wait, "
                          f"actual {outcome}")

    def check_forwarded_acks(self) -> None:
        """0.5.13 under PP: the n-th agreed write (load) ack count of a later stage is the n-th
        one its stage-0 counterpart agreed (recv of PP rank 0's value, in order)."""
        if self.forward is None:
            return
        for r in sorted(self.results):
            src = self.forward(r)[0]
            if src == r or src not in self.results:
                continue
            for kind in FORWARDED_KINDS:
                mine, theirs = (
                    [e for e in self._entries(x, "scheduler")[0]
                     if e.kind == kind and "write-back" not in str(e.outcome)] for x in (r, src))
                for i, (e, f) in enumerate(zip(mine, theirs, strict=False)):
                    if [int(v) for v in e.agreed] != [int(v) for v in f.agreed]:
                        self.fail("reduce", f"{kind} #{i} on rank {r}: {self.protocol} forwards "
                                  f"PP stage 0's count; local {list(e.local)}, rank {src} agreed "
                                  f"{list(f.agreed)}, expected {list(f.agreed)}, actual "
                                  f"{list(e.agreed)}")
                        break

    # -- per-rank rules --------------------------------------------------------------------
    def check_inserts(self) -> None:
        for r, res in sorted(self.results.items()):
            finals = self._final_agreed(r)
            done: dict[str, int] = {}
            for d in res.decisions.get("scheduler", ()):
                if d.kind != "prefetch_done" or not d.agreed:
                    continue
                rid = d.rid
                done[rid] = int(d.agreed[0])
                if rid in finals and finals[rid] != done[rid]:
                    self.fail("insert", f"prefetch_done({rid}) on rank {r}: local "
                              f"{list(d.local)}, the "
                              f"final progress ack agreed {finals[rid]}, expected {finals[rid]}, "
                              f"actual {done[rid]}")
            for a in res.actions:
                if a.kind != "prefetch_insert" or not a.values:
                    continue
                rid = a.rid
                got = int(a.values[0])
                want = done.get(rid, 0)
                if got != want and not (rid in self.aborted and got == 0):
                    self.fail("insert", f"prefetch of {rid} on rank {r}: agreed completed "
                              f"{want} tokens, expected {want} inserted, actual {got}")

    def check_stops(self) -> None:
        """A prefetch_done right after its can_terminate means the scheduler stopped it there:
        the agreement must have allowed that (an aborted request stops regardless)."""
        for r, res in sorted(self.results.items()):
            sched = res.decisions.get("scheduler", ())
            for i in range(1, len(sched)):
                prev, cur = sched[i - 1], sched[i]
                if (cur.kind == "prefetch_done" and prev.kind == "can_terminate"
                        and prev.rid == cur.rid and cur.rid not in self.aborted
                        and len(prev.agreed) == 2 and prev.agreed[0] != 0
                        and prev.agreed[1] == 0):
                    self.fail("terminate", f"scheduler decision #{i - 1} can_terminate({cur.rid}) "
                              f"on rank {r}: local {list(prev.local)}, agreed [1-can, terminated]="
                              f"{list(prev.agreed)}, expected wait, actual stopped (prefetch_done "
                              f"follows)")

    def run(self) -> list[tuple[str, str]]:
        self.check_agreements()
        self.check_forwarded_acks()
        self.check_inserts()
        self.check_stops()
        return self.out


def check_oracle(s: Any, results: list[RankResult]) -> list[tuple[str, str]]:
    """(rule, message) for every violation of the protocol, in decision order per channel."""
    return Oracle(s, results).run()
