"""Hypothesis strategies that build whole Schedules.

A Schedule is drawn as one value (ops, then one integer per decision point per rank), not one
rule per decision: that is what keeps generation fast, and shrinking still works on the lists.
Requests draw from a few shared prefixes so they hit each other's pages in device, host and
storage, with page-aligned and unaligned lengths.
"""

from __future__ import annotations

from hypothesis import strategies as st

from reference.api import DEFAULT_PROFILE, STOP_POLICIES, WRITE_POLICIES
from scenarios.core.config import EXPLORE_LAYOUTS, PAGE
from scenarios.core.schedule import CachePolicy, Op, Schedule, tokens_for
from scenarios.core.suts import is_sglang
from scenarios.generate.workload import prefetch_workloads


@st.composite
def cache_policies(draw: st.DrawFn) -> CachePolicy:
    return CachePolicy(
        page_size=PAGE,
        device_pages=draw(st.sampled_from([12, 24, 48])),
        host_pages=draw(st.sampled_from([16, 32, 64])),
        mla=draw(st.booleans()),
        write_policy=draw(st.sampled_from(WRITE_POLICIES)),
        prefetch_stop_policy=draw(st.sampled_from(STOP_POLICIES)),
        prefetch_threshold=draw(st.sampled_from([0, 8])),
        prefetch_batch_pages=draw(st.sampled_from([1, 1, 2, 3])),
        prefetch_timeout_ticks=draw(st.integers(0, 8)),
    )


@st.composite
def op_lists(draw: st.DrawFn, max_requests: int = 6) -> list[Op]:
    n = draw(st.integers(1, max_requests))
    ops: list[Op] = []
    live: list[str] = []
    for i in range(n):
        shared = draw(st.integers(0, 1))
        tokens = tokens_for(shared, draw(st.sampled_from([0, 16, 24])), i,
                            draw(st.integers(1, 9)))
        rid = f"q{i}"
        ops.append(Op(kind="add", rid=rid, tokens=tokens, prefetch=draw(st.sampled_from([True, True, False]))))
        live.append(rid)
        for _ in range(draw(st.integers(0, 2))):
            action = draw(st.sampled_from(["step", "step", "flush", "flush", "evict_device",
                                           "evict_host", "abort"]))
            if action == "flush":  # finish, back up, then drop L1 and L2: next hits are in L3
                ops += [Op(kind="step"), Op(kind="step"), Op(kind="evict_device", n=1000),
                        Op(kind="evict_host", n=1000)]
            elif action == "abort" and live:
                ops.append(Op(kind="abort", rid=draw(st.sampled_from(live))))
            elif action in ("evict_device", "evict_host"):
                ops.append(Op(kind=action, n=draw(st.sampled_from([8, 32, 1000]))))
            else:
                ops.append(Op(kind="step"))
    return ops


@st.composite
def prefetch_op_lists(draw: st.DrawFn) -> list[Op]:
    """Warm L3 with a prefix, drop it from L1 and L2, then have requests fetch it back: the
    shape that reaches the prefetch decision points (hits, progress, termination, revoke)."""
    shared_len = draw(st.sampled_from([16, 24, 32]))
    ops = [Op(kind="add", rid="warm", tokens=tokens_for(0, shared_len, 0, 3)),
           Op(kind="step"), Op(kind="step"),
           Op(kind="evict_device", n=1000), Op(kind="evict_host", n=1000)]
    for i in range(1, draw(st.integers(2, 3))):
        ops.append(Op(kind="add", rid=f"f{i}",
                      tokens=tokens_for(draw(st.sampled_from([0, 0, 1])), shared_len, i,
                                        draw(st.integers(1, 9)))))
        ops += [Op(kind="step")] * draw(st.integers(0, 2))
        if draw(st.integers(0, 4)) == 0:
            ops.append(Op(kind="abort", rid=f"f{i}"))
    return ops


@st.composite
def schedules(draw: st.DrawFn, layouts: tuple[str, ...] = EXPLORE_LAYOUTS,
              variant: str = "fixed", backend: str = "memory",
              protocol: str = DEFAULT_PROFILE, dp_attention: bool = True) -> Schedule:
    layout = draw(st.sampled_from(layouts))
    world = 1
    for x in layout.split("x"):
        world *= int(x)
    if draw(st.integers(0, 2)) == 2:  # a third: prefetches shaped to reach every outcome class
        return draw(prefetch_workloads(layouts=(layout,), variant=variant, backend=backend,
                                       protocol=protocol, dp_attention=dp_attention))
    ops = draw(st.one_of(op_lists(), prefetch_op_lists()))
    n_choices = 3 * sum(1 for o in ops if o.kind in ("step", "add")) + 8
    choice = st.integers(0, 4)
    choices = {r: draw(st.lists(choice, max_size=n_choices)) for r in range(world)}
    faults: dict[int, list[tuple[str, int]]] = {}
    if draw(st.booleans()):
        r = draw(st.integers(0, world - 1))
        faults[r] = draw(st.lists(st.tuples(st.sampled_from(["get", "get", "exists", "set"]),
                                            st.integers(0, 3)),
                                  min_size=1, max_size=2))
    skew = {r: draw(st.integers(0, 5)) for r in range(world)} if draw(st.booleans()) else {}
    return Schedule(name="generated", layout=layout, variant=variant, backend=backend,
                    protocol=protocol, dp_attention=dp_attention,
                    cache=draw(cache_policies()), ops=ops, choices=choices, faults=faults,
                    clock_skew=skew)


def for_sut(sut: str, layouts: tuple[str, ...], *, variant: str = "fixed",
            backend: str | None = None, protocol: str = DEFAULT_PROFILE,
            dp_attention: bool = True) -> st.SearchStrategy[Schedule]:
    """The Schedules one hunt draws for `sut`. The reference takes the variant and protocol
    profile; an SGLang release is its own protocol (MHA or MLA pools, as drawn)."""
    if not is_sglang(sut):
        return schedules(layouts=layouts, variant=variant, backend=backend or "memory",
                         protocol=protocol, dp_attention=dp_attention)

    def on_release(s: Schedule) -> Schedule:
        s = s.with_(sut=sut, dp_attention=dp_attention)
        return s.with_(backend=backend) if backend else s

    return schedules(layouts=layouts).map(on_release)
