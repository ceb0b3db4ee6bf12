"""The Schedules whose collectives `collective_paths --trace` attributes to SGLang functions:
the catalog's, plus the decode side of PD disaggregation (`decode_add`), which no catalog
Schedule exercises because the reference does not model it."""

from __future__ import annotations

from scenarios.core.schedule import Op, Schedule, tokens_for
from scenarios.generate.catalog import catalog_names, load_scenario


def decode_restore(sut: str, layout: str = "1x2") -> Schedule:
    """Two decode-side requests whose prefixes a prefill-style request cached before: one held
    only in storage (L3: the storage hit query, a prefetch, its progress check), one only on
    host (L2: init_load_back, the load-back event check). Each prefix is 16 tokens, above
    HiCache's load-back threshold (10 tokens)."""
    a, b = tokens_for(0, 16, 1, 4), tokens_for(1, 16, 2, 4)
    return Schedule(name="decode_restore", layout=layout, sut=sut, cache={"page_size": 4},
                    ops=[Op(kind="add", rid="p1", tokens=a, prefetch=False), Op(kind="step"),
                         Op(kind="step"), Op(kind="step"), Op(kind="evict_device", n=1000),
                         Op(kind="evict_host", n=1000),
                         Op(kind="add", rid="p2", tokens=b, prefetch=False), Op(kind="step"),
                         Op(kind="step"), Op(kind="evict_device", n=1000),
                         Op(kind="decode_add", rid="d1", tokens=tokens_for(0, 16, 3, 4)),
                         Op(kind="decode_add", rid="d2", tokens=tokens_for(1, 16, 4, 4)),
                         *[Op(kind="step")] * 5])


def traced(sut: str) -> list[Schedule]:
    return [load_scenario(n).with_(sut=sut) for n in catalog_names()] + [decode_restore(sut)]
