"""Command-line entry points for SGLang as the system under test (`--sut sglang==VERSION`).

`run` / `replay` / `explore` dispatch here when the SUT is a release; `bisect-releases`,
`matrix` and `sglang-envs` are ours. Every handler returns the contract's exit code:
0 agree, 1 diverge, 2 usage, 125 cannot judge here (no HiRadixCache, env cannot be built).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scenarios.contract import CannotJudge, ExitCode, UsageError
from scenarios.sglang import envs
from scenarios.sglang.executor import SglangExecutor, parse_sut


def contract(fn: Callable[..., int]) -> Callable[..., int]:
    """Map our two error types to exit codes with one line each."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> int:
        try:
            return fn(*a, **k)
        except CannotJudge as e:
            print(f"cpcheck: cannot run here: {e.diagnosis}", file=sys.stderr)
            return int(ExitCode.UNKNOWN)
        except UsageError as e:
            print(f"cpcheck: {e}", file=sys.stderr)
            return int(ExitCode.USAGE)
    return wrapper


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


def judge(s: Any, *, timeout: float = 20.0) -> tuple[int, Any]:
    """(exit code, verdict) of one Schedule on its SUT release."""
    version = parse_sut(s.sut)
    if version is None:
        raise UsageError("judge() is for sglang SUTs")
    with SglangExecutor(version, timeout_s=timeout, log=_log) as ex:
        v = ex.check(s)
    return (int(ExitCode.AGREE) if v.ok else int(ExitCode.DIVERGE)), v


def _print_verdict(v: Any) -> None:
    print(v.summary())
    for inv, msg in v.failures[1:4]:
        print(f"  also [{inv}]: {msg}")
    for note in v.stats.get("not_observed", []):
        print(f"  not observable on SGLang: {note}")


@contract
def cmd_run(args: argparse.Namespace, s: Any) -> int:
    s = with_sut(s, args.sut, _dp(args))
    code, v = judge(s, timeout=args.timeout)
    print(f"{s.name} layout={s.layout} sut={s.sut} dp_attention={s.dp_attention}")
    _print_verdict(v)
    if not v.ok:
        print(f"replay: cpcheck replay {write_sglang_replay(s, v, args.replay_dir)}")
    return code


@contract
def cmd_replay(args: argparse.Namespace, s: Any, data: dict) -> int:
    s = with_sut(s, args.sut, _dp(args))
    if s.layout_obj.world_size > 4:
        raise CannotJudge(f"layout {s.layout}: the SGLang SUT runs at most 4 ranks here")
    code, v = judge(s, timeout=args.timeout)
    print(f"replay {args.file}: layout={s.layout} sut={s.sut} dp_attention={s.dp_attention}")
    _print_verdict(v)
    return code


def _dp(args: argparse.Namespace) -> bool | None:
    flag = getattr(args, "dp_attention", None)
    return None if flag is None else flag == "on"


def hunt(version: str, dp: bool, layouts: tuple[str, ...], examples: int, seed: int,
         timeout: float = 20.0, ex: SglangExecutor | None = None,
         shrink_s: float | None = None) -> dict:
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
    ex = ex or SglangExecutor(version, timeout_s=timeout, log=_log)
    t0 = time.monotonic()
    state: dict = {"n": 0, "first": None}

    def fix(s: Any) -> Any:
        return s.with_(cache={**s.cache.model_dump(), "mla": False}, sut=sut, dp_attention=dp)

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
        v = annotate(check(s, results), dp)
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
        verdict = annotate(check(found, ex.run(found, dp)), dp)
    except NoSuchExample:
        found, verdict = None, None
    except Exception as e:  # budget spent, or Hypothesis saw a failure that did not recur
        found = state.get("best")
        if found is None:
            raise
        verdict = annotate(check(found, ex.run(found, dp)), dp)
        if verdict.ok:  # say so rather than report a divergence that does not reproduce
            verdict.message = f"diverged once, agreed on rerun ({type(e).__name__})"
            state["flaky"] = True
    finally:
        if own:
            ex.close()
    return {"found": found, "verdict": verdict, "examples": state["n"],
            "flaky": state.get("flaky", False),
            "first_s": state["first"], "total_s": time.monotonic() - t0}


@contract
def cmd_explore(args: argparse.Namespace) -> int:
    version = parse_sut(args.sut)
    layouts = tuple(args.layout or ["1x2", "2x2"])
    h = hunt(version, _dp(args) is not False, layouts, args.examples, args.seed, args.timeout)
    if h["found"] is None:
        print(f"no divergence in {h['examples']} schedules ({h['total_s']:.1f} s)")
        return int(ExitCode.AGREE)
    if h["flaky"]:
        _print_verdict(h["verdict"])
        return int(ExitCode.UNKNOWN)
    print(f"divergence after {h['first_s']:.2f} s; shrunk to {len(h['found'].ops)} ops "
          f"({h['examples']} schedules, {h['total_s']:.1f} s)")
    _print_verdict(h["verdict"])
    print(f"replay: cpcheck replay {write_sglang_replay(h['found'], h['verdict'], args.replay_dir)}")
    return int(ExitCode.DIVERGE)


@contract
def cmd_bisect_releases(args: argparse.Namespace) -> int:
    """Replay FILE on every release in order; name the first whose verdict differs from the
    first release's. Releases that cannot run (125) are shown and skipped."""
    from scenarios.replay import read_replay

    s, _ = read_replay(args.file)
    releases = args.release or envs.releases_in_range()
    first: tuple[str, int] | None = None
    for v in releases:
        try:
            code, verdict = judge(with_sut(s, f"sglang=={v}", _dp(args)), timeout=args.timeout)
            what = verdict.summary()
        except CannotJudge as e:
            code, what = int(ExitCode.UNKNOWN), f"cannot run here: {e.diagnosis}"
        print(f"sglang {v}: exit {code}: {what[:160]}", flush=True)
        if code == ExitCode.UNKNOWN:
            continue
        if first is None:
            first = (v, code)
        elif code != first[1]:
            word = "agreeing" if code == ExitCode.AGREE else "diverging"
            print(f"first {word} release: {v} (after {first[0]} .. its predecessor: "
                  f"{'agree' if first[1] == 0 else 'diverge'})")
            return int(ExitCode.AGREE)
    print("the verdict does not change over these releases")
    return int(ExitCode.DIVERGE)


@contract
def cmd_envs(args: argparse.Namespace) -> int:
    return envs.main(args.release)


def add_subcommands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    b = sub.add_parser("bisect-releases", help="replay FILE on each SGLang release 0.5.9 .. "
                       "0.5.20 and name the first whose verdict changes")
    b.add_argument("file")
    b.add_argument("--release", action="append", help="repeatable (default: every release)")
    common(b)
    e = sub.add_parser("sglang-envs", help="build and cache the per-release environments")
    e.add_argument("release", nargs="*")
    d = sub.add_parser("diff", help="one Schedule on the reference profile of a release and "
                       "on that release: the first scheduler decision where they differ")
    from scenarios.sglang.differential import add_diff_arguments

    add_diff_arguments(d)
    m = sub.add_parser("matrix", help="release x dp-attention x layout: agree / diverge")
    from scenarios.sglang.matrix import add_matrix_arguments

    add_matrix_arguments(m)


def add_sut_flags(p: argparse.ArgumentParser) -> None:
    # --dp-attention comes from scenarios/protocol_args.py (run, explore, soak)
    p.add_argument("--sut", default=None, help="reference (default) or sglang==VERSION")


def handlers() -> dict[str, Callable[[argparse.Namespace], int]]:
    from scenarios.sglang.differential import cmd_diff
    from scenarios.sglang.matrix import cmd_matrix

    return {"diff": contract(cmd_diff), "bisect-releases": cmd_bisect_releases, "sglang-envs": cmd_envs,
            "matrix": contract(cmd_matrix)}


_ = json
