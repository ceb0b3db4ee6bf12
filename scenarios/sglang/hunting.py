"""Judging and hunting on SGLang's own HiCache: shared by the CLI, the matrix and the release walk."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from scenarios.contract import ExitCode, UsageError
from scenarios.sglang.executor import SglangExecutor, parse_sut


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
    from scenarios.replay import write_replay

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
    return (int(ExitCode.AGREE) if v.ok else int(ExitCode.DIVERGE)), v


def hunt(version: str, dp: bool, layouts: tuple[str, ...], examples: int, seed: int,
         timeout: float = 20.0, ex: SglangExecutor | None = None,
         shrink_s: float | None = None, backend: str | None = None,
         mooncake_master: str = "") -> dict:
    """Generate, run on the release, shrink: the same loop as scenarios.explore.hunt, with
    SGLang's verdict (annotated for what it cannot observe) and MHA pools only."""
    import random

    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    from scenarios.checker import check
    from scenarios.explore import steer
    from scenarios.sglang.executor import annotate
    from scenarios.strategies import schedules

    sut = f"sglang=={version}"
    own = ex is None
    ex = ex or SglangExecutor(version, timeout_s=timeout, log=_log,
                              mooncake_master=mooncake_master)
    t0 = time.monotonic()
    state: dict = {"n": 0, "first": None}

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
        results = ex.run(s, dp)
        steer(results)
        v = annotate(check(s, results), dp, s.backend)
        if not v.ok:
            if state["first"] is None:
                state["first"] = time.monotonic() - t0
            if state.get("best") is None or len(s.ops) < len(state["best"].ops):
                state["best"] = s
        return not v.ok

    cfg = settings(max_examples=examples, database=None, deadline=None,
                   suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    try:
        found = find(schedules(layouts=layouts).map(fix), fails, settings=cfg,
                     random=random.Random(seed))
        verdict = annotate(check(found, ex.run(found, dp)), dp, found.backend)
    except NoSuchExample:
        found, verdict = None, None
    except Exception as e:  # budget spent, or Hypothesis saw a failure that did not recur
        found = state.get("best")
        if found is None:
            raise
        verdict = annotate(check(found, ex.run(found, dp)), dp, found.backend)
        if verdict.ok:  # say so rather than report a divergence that does not reproduce
            verdict.message = f"diverged once, agreed on rerun ({type(e).__name__})"
            state["flaky"] = True
    finally:
        if own:
            ex.close()
    return {"found": found, "verdict": verdict, "examples": state["n"],
            "flaky": state.get("flaky", False),
            "first_s": state["first"], "total_s": time.monotonic() - t0}
