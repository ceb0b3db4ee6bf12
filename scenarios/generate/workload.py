"""Workload shaping: Schedules and soak chunks that reach every prefetch outcome class.

Plain generation mostly prefetches pages that were never stored, so almost every prefetch ends
revoked (94-97% in soaks) and the paths where CP ranks can disagree (partial progress, a policy
stopping IO mid-transfer, storage errors mid-batch) are rare. Here each prefetch is drawn with an
*intent* (one of coverage.PREFETCH_CLASSES) and the Schedule is built to realise it:

- a warm-up writes a shared prefix through to host and storage, then drops it from L1 and L2,
  so the prefix is in L3 only;
- each fetch re-adds the prefix: `revoked` uses a prefix that was never stored, `aborted` aborts
  before the next step, `complete` asks for exactly the stored pages and `partial` for the
  stored prefix plus pages of its own, both with every IO batch open before the progress point;
  `terminated` opens fewer than all batches on every rank under best_effort or an expired
  timeout; `storage_error` opens every batch but fails one `get` on one rank;
- every other decision point gets the choice "all queued units done" (ALL), so the warm-up and
  the flushes between fetches are deterministic and the intent choice lands on the progress point.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import strategies as st

from reference.api import DEFAULT_PROFILE, get_profile
from scenarios.core.config import CP_LAYOUTS, PAGE
from scenarios.core.schedule import CachePolicy, Op, Schedule, tokens_for
from scenarios.judge.coverage import PREFETCH_CLASSES, Coverage

#: a choice c opens c % (pending + 1) more units: 2519 = lcm(1..10) - 1 opens all of <= 9 pending
ALL = 2519
#: the at-points of one scheduler step with storage: writing_check, loading_check, drain
STEP_POINTS = 3
#: steps after the warm-up add: run it and write it through, then ack and back it up
WARM_STEPS = 2


def warm_steps(protocol: str) -> int:
    """WARM_STEPS, plus one where the drain reads its queues before `writing_check` starts
    the backup (0.5.17+'s single MIN): the backup is acked, and its host copy let go, a step
    later."""
    return WARM_STEPS + int(get_profile(protocol).ready_counts_one_min)
#: a prefetch class below this share of the prefetches so far gets a gated soak chunk
LAGGING = 0.16  # just under 1/6: six classes can all stay above it
#: intents a stop policy can realise (wait_complete never stops with IO outstanding); one key
#: per name in reference.api.STOP_POLICIES (tests/test_single_source.py checks it)
INTENTS = {
    "best_effort": PREFETCH_CLASSES,
    "timeout": PREFETCH_CLASSES,
    "wait_complete": ("revoked", "aborted", "complete", "partial", "storage_error"),
}


def build_prefetch_schedule(layout: str, policy: str, intents: list[str], *, shared_len: int,
                            batch_pages: int, mla: bool, picks: list[list[int]],
                            fault_batch: list[int], fault_rank: list[int],
                            variant: str = "fixed", backend: str = "memory",
                            timeout_ticks: int = 2, seed: int = 0,
                            protocol: str = DEFAULT_PROFILE, dp_attention: bool = True,
                            threshold: int = 0, fault_kind: list[str] | None = None
                            ) -> Schedule:
    """A gated Schedule whose k-th fetch realises intents[k].

    picks[k][r]: for terminated, how many IO batches rank r has done at the progress point
    (clamped below all); fault_batch[k] / fault_rank[k]: which batch fails where;
    fault_kind[k] ("get" by default): a storage_error fails that `get`, ("exists") the hit
    query of pages that are stored, which revokes the fetch, or ("set") the warm-up's backup on
    one rank (its later hit queries miss). `threshold` (tokens): the prefetch
    threshold; a fetch whose stored pages fall below it is revoked whatever its intent, and one
    whose own page-aligned length falls below it starts no prefetch at all.
    """
    if threshold < PAGE and get_profile(protocol).revoke_threshold == "cache":
        # 0.5.18+ revoke below the threshold as configured: a never-stored prefix at 0 would
        # be kept, not revoked; one page is what 0 meant before (the controller clamped it)
        threshold = PAGE
    world = 1
    for x in layout.split("x"):
        world *= int(x)
    hits = shared_len // PAGE
    nb = -(-hits // batch_pages)
    warm = tokens_for(0, shared_len, 0, 3)
    steps = warm_steps(protocol)
    ops = [Op(kind="add", rid="warm", tokens=warm, prefetch=False),
           *[Op(kind="step")] * steps,
           Op(kind="evict_device", n=1000), Op(kind="evict_host", n=1000)]
    choices: dict[int, list[int]] = {r: [ALL] * (steps * STEP_POINTS) for r in range(world)}
    faults: dict[int, list[tuple[str, int]]] = {}
    gets = [0] * world  # get calls so far per rank: a fault names the call by its index
    started = 0  # prefetches started so far (every rank the same): an exists fault's index
    floor = max(threshold, PAGE)  # SGLang clamps the threshold to at least one page
    for k, intent in enumerate(intents):
        rid = f"f{k}"
        shared = 0 if intent != "revoked" else 100 + k  # a prefix nobody stored
        tokens = warm if intent == "complete" else tokens_for(shared, shared_len, k + 1, 5)
        ops.append(Op(kind="add", rid=rid, tokens=tokens))
        if intent == "aborted":
            ops.append(Op(kind="abort", rid=rid))
        ops.append(Op(kind="step"))
        progress: list[int | None] = [None] * world  # None: no progress point this step
        kind = (fault_kind or ["get"] * len(intents))[k]
        if len(tokens) // PAGE * PAGE < floor:
            intent = "none"  # too short to prefetch at all
        else:
            started += 1
            if intent == "storage_error" and kind == "set":  # the warm-up's backup fails
                faults.setdefault(fault_rank[k] % world, []).append(("set", 0))
                intent = "partial"
            elif intent == "storage_error" and kind == "exists":
                fr = fault_rank[k] % world
                faults.setdefault(fr, []).append(("exists", started - 1))
                intent = "revoked"  # this rank's hit query finds nothing: the MIN is 0
            elif hits * PAGE < floor:
                intent = "revoked"
        if intent in ("complete", "partial"):
            progress = [ALL] * world
            for r in range(world):
                gets[r] += nb
        elif intent == "terminated":
            want = [min(nb - 1, p) for p in picks[k][:world]]
            want += [want[-1]] * (world - len(want))
            progress = list(want)
            for r in range(world):
                gets[r] += want[r]
        elif intent == "storage_error":
            progress = [ALL] * world
            fr, fb = fault_rank[k] % world, fault_batch[k] % nb
            faults.setdefault(fr, []).append(("get", gets[fr] + fb))
            for r in range(world):
                gets[r] += fb + 1 if r == fr else nb
        for r in range(world):
            choices[r] += [ALL] * STEP_POINTS + ([] if progress[r] is None else [progress[r]])
            choices[r] += [ALL] * ((steps - 1) * STEP_POINTS)  # the flush steps below
        if k < len(intents) - 1:  # back to L3 only for the next fetch
            ops += [*[Op(kind="step")] * (steps - 1),
                    Op(kind="evict_device", n=1000), Op(kind="evict_host", n=1000)]
    cache = CachePolicy(page_size=PAGE, device_pages=64, host_pages=96, mla=mla,
                        write_policy="write_through", prefetch_stop_policy=policy,
                        prefetch_threshold=threshold, prefetch_batch_pages=batch_pages,
                        prefetch_timeout_ticks=timeout_ticks)
    return Schedule(name="shaped", layout=layout, variant=variant, backend=backend, cache=cache,
                    ops=ops, choices=choices, faults=faults, seed=seed, protocol=protocol,
                    dp_attention=dp_attention)


#: the prefetch threshold, in pages relative to the stored prefix's pages (None: 0, clamped to
#: one page): most workloads put it one page below, at or one page above the hits
THRESHOLDS = (0, None, -1, 1, None)


@st.composite
def prefetch_workloads(draw: st.DrawFn, layouts: tuple[str, ...] = CP_LAYOUTS,
                       variant: str = "fixed", backend: str = "memory",
                       protocol: str = DEFAULT_PROFILE, dp_attention: bool = True) -> Schedule:
    """One Schedule of 1-4 fetches, each drawn with an outcome intent (see the module doc).

    Drawn to meet coverage.BOUNDARY_CLASSES: the prefetch threshold one page below, at or above
    the stored pages; a `timeout` deadline one tick before, at or after the progress point (4
    ticks after the add); 3-page batches over 4, 6 or 8 stored pages; a storage error on a
    get, a hit query of stored pages or the warm-up's backup."""
    layout = draw(st.sampled_from(layouts))
    policy = draw(st.sampled_from(["timeout", "best_effort", "wait_complete", "timeout"]))
    n = draw(st.integers(1, 4))
    intents = draw(st.lists(st.sampled_from(INTENTS[policy]), min_size=n, max_size=n))
    if draw(st.booleans()):  # a fetch that meets a fault or the deadline, wherever drawn
        intents[draw(st.integers(0, n - 1))] = draw(st.sampled_from(
            ["terminated", "storage_error"] if policy != "wait_complete" else ["storage_error"]))
    ints = st.integers(0, 7)
    shared_len = draw(st.sampled_from([16, 24, 32, 16]))
    at = draw(st.sampled_from(THRESHOLDS))
    return build_prefetch_schedule(
        layout, policy, intents,
        shared_len=shared_len,
        # 3 pages: 4, 6 and 8 stored pages fill whole batches, leave one page over or one short
        batch_pages=draw(st.sampled_from([3, 1, 2, 3])),
        mla=draw(st.booleans()),
        picks=[draw(st.lists(ints, min_size=4, max_size=4)) for _ in range(n)],
        fault_batch=[draw(ints) for _ in range(n)],
        fault_rank=[draw(ints) for _ in range(n)],
        variant=variant, backend=backend, protocol=protocol, dp_attention=dp_attention,
        timeout_ticks=draw(st.sampled_from([3, 5, 4])),
        threshold=0 if at is None else (shared_len // PAGE + at) * PAGE,
        fault_kind=[draw(st.sampled_from(["exists", "get", "set"])) for _ in range(n)],
    )


# -- free-running soak chunks ------------------------------------------------------------------
def shape_chunk(rng: random.Random, s: Schedule) -> Schedule:
    """Reshape a soak chunk so its prefetches spread over the outcome classes.

    The chunk's own ops stay (writes, evictions, aborts under its pools and write policy) but
    add without prefetch; then a fetch section follows. Free-running runs have no gates, so
    intents are realised by timing: shared prefixes are warmed into storage and dropped from L1
    and L2; long prefixes fetched in one-page batches race the next step's progress point
    (terminated under best_effort or an expired timeout when the IO loses: with in-memory storage
    it needs `--faults storage_latency`); a fifth ask for a prefix nobody stored (revoked), about
    a fifth are aborted at once, the rest ask for exactly the stored pages (complete) or for the
    stored prefix plus pages of their own (partial). A storage error mid-batch needs
    `--faults storage_errors`.
    """
    groups = 2
    shared_len = rng.choice([32, 48])
    ops = [o.model_copy(update={"prefetch": False}) if o.kind == "add" else o for o in s.ops]
    ops += [Op(kind="step")] * 3
    for g in range(groups):  # warm: in storage, then only there
        ops += [Op(kind="add", rid=f"w{g}", tokens=tokens_for(g, shared_len, 900 + g, 3),
                   prefetch=False), Op(kind="step")]
    flush = [Op(kind="step")] * 3 + [Op(kind="evict_device", n=1000)] + \
        [Op(kind="step")] * 3 + [Op(kind="evict_host", n=1000)]
    ops += flush
    i = 0
    for _ in range(rng.randint(3, 4)):
        # a burst of fetches before one step: the IO thread serves them in order, so the later
        # ones are still queued or mid-transfer when the step's progress point comes
        for _ in range(rng.choice([1, 2, 3])):
            rid = f"f{i}"
            roll = rng.random()
            unstored = roll < 0.2
            g = rng.randrange(groups)
            if unstored:  # revoked: nobody stored this prefix
                tokens = tokens_for(50 + i, shared_len, 500 + i, 5)
            elif roll < 0.6:  # complete: exactly the stored pages
                tokens = tokens_for(g, shared_len, 900 + g, 3)
            else:  # partial: the stored prefix, then pages of its own
                tokens = tokens_for(g, shared_len, 500 + i, rng.randint(4, 12))
            ops.append(Op(kind="add", rid=rid, tokens=tokens))
            if not unstored and rng.random() < 0.25:
                ops.append(Op(kind="abort", rid=rid))
            i += 1
        ops.append(Op(kind="step"))
        ops += flush  # back to L3 only, so the next fetch of these prefixes hits again
    policy = s.cache.write_policy
    cache = s.cache.model_copy(update={
        "device_pages": max(s.cache.device_pages, 96), "host_pages": max(s.cache.host_pages, 128),
        # selective write-through only writes a node after two hits: the warm-up would not stick
        "write_policy": "write_through" if policy == "write_through_selective" else policy,
        "prefetch_threshold": 0, "prefetch_batch_pages": 1,
        "prefetch_stop_policy": rng.choice(["best_effort", *INTENTS]),  # best_effort twice
        "prefetch_timeout_ticks": rng.choice([0, 1]),
    })
    return s.with_(ops=ops, cache=cache.model_dump())


def soak_chunk(rng: random.Random, index: int, layout: str, variant: str, backend: str,
               make_chunk: Any, coverage: Coverage, allow_gated: bool = True
               ) -> tuple[Schedule, bool]:
    """The soak's next chunk and whether to run it gated.

    Coverage-guided: while some prefetch class is below LAGGING of the prefetches counted so
    far, the chunk is a gated Schedule built to reach the lagging classes (timing alone rarely
    stops IO mid-transfer, and storage errors need faults); otherwise a shaped free-running
    chunk. `allow_gated=False` forces a free-running one. A soak's faults act in both kinds.
    """
    low = coverage.lagging(LAGGING) if allow_gated else []
    if low:
        n = 6
        intents = [low[k % len(low)] for k in range(n)]
        rng.shuffle(intents)
        policy = rng.choice([p for p, ok in INTENTS.items() if set(intents) <= set(ok)])
        s = build_prefetch_schedule(
            layout, policy, intents, shared_len=rng.choice([16, 24, 32]),
            batch_pages=rng.choice([1, 2]), mla=rng.random() < 0.3,
            picks=[[rng.randrange(8) for _ in range(4)] for _ in range(n)],
            fault_batch=[rng.randrange(8) for _ in range(n)],
            fault_rank=[rng.randrange(8) for _ in range(n)],
            variant=variant, backend=backend, timeout_ticks=rng.randrange(4),
            seed=rng.randrange(1 << 30))
        coverage.counts["soak chunks"]["gated, built for lagging classes"] += 1
        return s.with_(name=f"soak-{index}-shaped"), True
    coverage.counts["soak chunks"]["free-running, shaped"] += 1
    return shape_chunk(rng, make_chunk(rng, index, layout, variant, backend)), False
