"""The quick reset (scenarios/sglang/quick_reset.py) changes how long SGLang's cache takes to
build, nothing it does: the same generated Schedules give the same per-rank logs with it and
with SGLang's own reset and its idle second. Marker `sglang` (needs the 0.5.10.post1 env)."""

from __future__ import annotations

import os
import random

import pytest

from scenarios.sglang import envs

PRE = "0.5.10.post1"
#: one release per controller generation: revoke queue (0.5.10.post1, 0.5.13), hit queue (0.5.20)
RELEASES = (PRE, "0.5.13", "0.5.20")


def _schedules(n: int, version: str) -> list:
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    from scenarios.strategies import schedules

    got: list = []

    def take(s: object) -> bool:
        got.append(s.with_(cache={**s.cache.model_dump(), "mla": False},  # type: ignore[attr-defined]
                           sut=f"sglang=={version}"))
        return False

    try:
        find(schedules(layouts=("1x2",)), take, random=random.Random(11),
             settings=settings(max_examples=n, database=None, deadline=None,
                               phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        pass
    return got[:n]


KEYS = ("decisions", "digests", "outcomes", "collectives", "stored", "error")


def _logs(version: str, scheds: list, idle: bool) -> list[list[dict]]:
    from scenarios.sglang.executor import SglangExecutor
    from scenarios.sglang.quick_reset import IDLE_RESET_ENV

    os.environ.pop(IDLE_RESET_ENV, None)
    if idle:
        os.environ[IDLE_RESET_ENV] = "1"  # the pool's workers inherit it
    try:
        with SglangExecutor(version, timeout_s=20, build=False) as ex:
            out = []
            for s in scheds:
                res = ex.run(s, True)
                out.append([{k: r.get(k) for k in (*KEYS, "build_s")} for r in res])
            return out
    finally:
        os.environ.pop(IDLE_RESET_ENV, None)


@pytest.mark.sglang
@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", RELEASES)
def test_quick_reset_keeps_every_log_and_drops_the_idle_second(version: str) -> None:
    """Budget: 12 generated 1x2 Schedules (DP attention), each run with both resets: per-rank
    decisions, tree digests, outcomes, collectives, stored keys equal."""
    from scenarios.contract import CannotJudge
    from scenarios.sglang.executor import check_pipeline

    m = envs.load_manifest(version)
    if m is None or not m.ok:
        pytest.skip(f"sglang env not built here: python -m scenarios.sglang.envs {version}")
    try:
        check_pipeline(version)
    except CannotJudge as e:
        pytest.skip(e.diagnosis)
    scheds = _schedules(12, version)
    assert len(scheds) == 12
    quick = _logs(version, scheds, idle=False)
    idle = _logs(version, scheds, idle=True)
    for i, (a, b) in enumerate(zip(quick, idle, strict=True)):
        for ra, rb in zip(a, b, strict=True):
            for k in KEYS:
                assert ra[k] == rb[k], f"Schedule {i}, rank key {k}: quick {ra[k]} vs idle {rb[k]}"
    build_quick = max(r["build_s"] for a in quick for r in a)
    build_idle = min(r["build_s"] for b in idle for r in b)
    assert build_idle > 0.9 > 0.5 > build_quick, (build_idle, build_quick)
