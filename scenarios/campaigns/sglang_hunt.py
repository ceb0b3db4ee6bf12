"""Judging and hunting on SGLang's own HiCache: shared by the CLI, the matrix and the release walk."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from scenarios.core.contract import UsageError
from scenarios.sut.sglang.executor import SglangExecutor, parse_sut, verdict_of


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def with_sut(s: Any, sut: str | None, dp: bool | None = None) -> Any:
    changes: dict[str, Any] = {}
    if sut:
        parse_sut(sut)
        changes["sut"] = sut
    if dp is not None:
        changes["dp_attention"] = dp
    return s.with_(**changes) if changes else s


def write_sglang_replay(s: Any, verdict: Any, out_dir: str) -> Path:
    from scenarios.store.replay import write_replay

    path = write_replay(s, verdict, out_dir, "torchrun")
    version = parse_sut(s.sut)
    dp = "dpattn" if s.dp_attention else "nodp"
    new = path.with_name(f"replay-sglang-{version}-{dp}-{s.layout}-{s.digest()}.json")
    path.rename(new)
    return new


def judge(s: Any, *, timeout: float = 20.0, mooncake_master: str = "") -> tuple[int, Any]:
    """(exit code, verdict) of one Schedule on its SUT release (backend mooncake: on the
    master given, else on one started and stopped here)."""
    version = parse_sut(s.sut)
    if version is None:
        raise UsageError("judge() is for sglang SUTs")
    with SglangExecutor(version, timeout_s=timeout, log=_log,
                        mooncake_master=mooncake_master) as ex:
        v = ex.check(s)
    return v.exit_code, v  # unknown (125) when the machine broke the run


def confirm(ex: Any, s: Any, dp: bool, n: int) -> tuple[int, Any]:
    """Replay `s` n times on the same pool: (how many runs diverged, the first diverging
    verdict, else the last one). A divergence that never recurs is flaky, not a finding."""
    from scenarios.runner import RankPoolError

    k, first, last = 0, None, None
    for _ in range(n):
        try:
            results = ex.run(s, dp)
        except RankPoolError as e:  # the pool broke, not the Schedule: not counted either way
            _log(f"replay not judged (pool): {type(e).__name__}: {e}")
            continue
        v = verdict_of(s, results, dp)
        if v.status == "unknown":  # the machine broke the run (e.g. no free host memory)
            _log(f"replay not judged: {v.diagnosis}")
            continue
        last = v
        if not v.ok:
            k += 1
            if first is None:
                first = v
    return k, first or last


def hunt(version: str, dp: bool, layouts: tuple[str, ...], examples: int, seed: int,
         timeout: float = 20.0, ex: SglangExecutor | None = None,
         shrink_s: float | None = None, replays: int = 1, backend: str | None = None,
         mooncake_master: str = "") -> dict:
    """Generate, run on the release, shrink, then replay the smallest failing Schedule
    `replays` times: the same loop as scenarios.campaigns.explore.hunt, with SGLang's verdict (annotated
    for what it cannot observe) and MHA pools only. A run the pool could not answer (it broke
    or timed out) is not judged (`infra_errors`), never counted as agree or diverge."""
    import random

    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    from scenarios.campaigns.explore import steer
    from scenarios.generate.strategies import schedules
    from scenarios.runner import RankPoolError

    sut = f"sglang=={version}"
    own = ex is None
    ex = ex or SglangExecutor(version, timeout_s=timeout, log=_log,
                              mooncake_master=mooncake_master)
    t0 = time.monotonic()
    state: dict = {"n": 0, "first": None, "first_n": None, "infra": []}

    def fix(s: Any) -> Any:
        s = s.with_(cache={**s.cache.model_dump(), "mla": False}, sut=sut, dp_attention=dp)
        return s.with_(backend=backend) if backend else s

    class _Spent(Exception):
        pass

    def fails(s: Any) -> bool:
        # a shrink budget: once spent, stop and keep the smallest failing Schedule seen
        if shrink_s is not None and state["first"] is not None and \
                time.monotonic() - t0 - state["first"] > shrink_s:
            raise _Spent
        state["n"] += 1
        try:
            results = ex.run(s, dp)
        except RankPoolError as e:
            _log(f"run not judged (pool): {type(e).__name__}: {e}")
            state["infra"].append(f"{type(e).__name__}: {str(e)[:1500]}")
            state.setdefault("infra_s", []).append(s)  # kept, to replay what broke the pool
            return False
        v = verdict_of(s, results, dp)
        if v.status == "unknown":  # the machine, not the release: never agree or diverge
            _log(f"run not judged: {v.diagnosis}")
            state["infra"].append((v.diagnosis or "")[:1500])
            state.setdefault("infra_s", []).append(s)
            return False
        steer(results)
        if not v.ok:
            if state["first"] is None:
                state["first"] = time.monotonic() - t0
                state["first_n"] = state["n"]
                state["first_seen"] = v.summary()[:400]
            if state.get("best") is None or len(s.ops) < len(state["best"].ops):
                state["best"], state["best_seen"] = s, v.summary()[:400]
        return not v.ok

    cfg = settings(max_examples=examples, database=None, deadline=None,
                   suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    reproduced, verdict, note = 0, None, ""
    try:
        try:
            found = find(schedules(layouts=layouts).map(fix), fails, settings=cfg,
                         random=random.Random(seed))
        except NoSuchExample:
            found = None
        except Exception as e:  # budget spent, or Hypothesis saw a failure that did not recur
            found = state.get("best")
            if found is None:
                raise
            note = type(e).__name__
        shrink_end = time.monotonic() - t0
        if found is not None:
            reproduced, verdict = confirm(ex, found, dp, max(1, replays))
            if verdict is not None and verdict.ok:
                # say so rather than report a divergence that does not reproduce
                verdict.message = (f"diverged once, agreed on {replays} replays"
                                   + (f" ({note})" if note else ""))
    finally:
        if own:
            ex.close()
    return {"found": found, "verdict": verdict, "examples": state["n"],
            "flaky": found is not None and reproduced == 0,
            "reproduced": reproduced, "replays": max(1, replays) if found is not None else 0,
            "first_s": state["first"], "first_n": state["first_n"],
            # what the hunt saw, whatever the replays say (a flaky cell's only evidence)
            "first_seen": state.get("first_seen"), "best_seen": state.get("best_seen"),
            "shrink_s": None if state["first"] is None else shrink_end - state["first"],
            "infra_errors": state["infra"], "infra_schedules": state.get("infra_s", []),
            "total_s": time.monotonic() - t0}
