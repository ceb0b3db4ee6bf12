"""The subcommands that only make sense for SGLang releases: bisect-releases, sglang-envs,
diff and matrix. (`run`, `replay`, `explore` take `--sut sglang==VERSION` like any SUT.)

Every handler returns the contract's exit code: 0 agree, 1 diverge, 2 usage, 125 cannot judge
here (no cache class this code can drive, an environment that cannot be built).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from scenarios.campaigns.release_walk import judge, with_sut
from scenarios.cli.conventions import emit_status
from scenarios.core.contract import ExitCode
from scenarios.core.errors import CannotJudge, UsageError
from scenarios.sut.sglang import envs


def contract(fn: Callable[..., int]) -> Callable[..., int]:
    """Map our two error types to exit codes with one line each."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> int:
        args = a[0] if a and isinstance(a[0], argparse.Namespace) else None
        try:
            return fn(*a, **k)
        except CannotJudge as e:
            line, code, status = f"cannot run here: {e.diagnosis}", ExitCode.UNKNOWN, "unknown"
        except UsageError as e:
            line, code, status = str(e), ExitCode.USAGE, "usage"
        print(f"cpcheck: {line}", file=sys.stderr)
        if args is not None:
            emit_status(args, status, code, line)
        return int(code)
    return wrapper


def _dp(args: argparse.Namespace) -> bool | None:
    flag = getattr(args, "dp_attention", None)
    return None if flag is None else flag == "on"


@contract
def cmd_bisect_releases(args: argparse.Namespace) -> int:
    """Replay FILE on every release in order; name the first whose verdict differs from the
    first release's. Releases that cannot run (125) are shown and skipped."""
    from scenarios.store.replay import read_replay

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
    return envs.main(args.release + (["--newest"] if args.newest else []))


def add_subcommands(sub: Any, common: Callable[[argparse.ArgumentParser], None],
                    **sub_kw: Any) -> None:
    """The SGLang subcommands, with the same help conventions (`sub_kw`) as the others."""
    b = sub.add_parser("bisect-releases", help="replay FILE on each SGLang release from "
                       "0.5.9 on and name the first whose verdict changes", **sub_kw)
    b.add_argument("file")
    b.add_argument("--release", action="append", help="repeatable (default: every release)")
    common(b)
    e = sub.add_parser("sglang-envs", help="build and cache the per-release environments",
                       **sub_kw)
    e.add_argument("release", nargs="*")
    e.add_argument("--newest", action="store_true",
                   help="the newest release on the package index (pip index versions sglang)")
    d = sub.add_parser("diff", help="one Schedule on the reference profile of a release and "
                       "on that release: the first scheduler decision where they differ",
                       **sub_kw)
    from scenarios.cli.campaign_args import add_diff_arguments, add_matrix_arguments

    add_diff_arguments(d)
    m = sub.add_parser("matrix", help="release x dp-attention x layout: agree / diverge",
                       **sub_kw)
    add_matrix_arguments(m)


def add_sut_flags(p: argparse.ArgumentParser) -> None:
    # --dp-attention comes from scenarios/cli/protocol_args.py (run, explore, soak)
    p.add_argument("--sut", default=None, help="reference (default), sglang==VERSION (a "
                   "release) or sglang@PATH (a source tree: PATH holds the sglang package)")


def handlers() -> dict[str, Callable[[argparse.Namespace], int]]:
    from scenarios.cli.campaign_args import cmd_diff, cmd_matrix

    return {"diff": contract(cmd_diff), "bisect-releases": cmd_bisect_releases, "sglang-envs": cmd_envs,
            "matrix": contract(cmd_matrix)}

