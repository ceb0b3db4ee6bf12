"""The arguments of the campaign commands (diff, matrix, soak --shard) and the configs they
build: argparse stays here, and a campaign below the CLI takes plain values."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reference.api import DP_ATTENTION_CHOICES
from scenarios.core.config import MATRIX_LAYOUTS
from scenarios.core.errors import UsageError
from scenarios.core.releases import release_tuple
from scenarios.core.timeouts import SGLANG_AGREEMENT_S

if TYPE_CHECKING:  # the campaign imports SGLang helpers: only when a matrix runs
    from scenarios.campaigns.matrix import MatrixConfig


def add_diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="a catalog name, .toml, or a replay .json")
    p.add_argument("--sut", default=None, help="sglang==VERSION (default: the release a "
                   "differential replay file names)")
    p.add_argument("--protocol", default=None, help="reference profile (default: the one "
                   "modelling the release)")
    p.add_argument("--layout")
    p.add_argument("--dp-attention", choices=DP_ATTENTION_CHOICES, default=None,
                   help="default: the scenario's")
    p.add_argument("--timeout", type=float, default=SGLANG_AGREEMENT_S,
                   help="seconds a rank waits at one agreement (every other wait derives from it)")


def cmd_diff(args: argparse.Namespace) -> int:
    from scenarios.campaigns.differential import diff_one

    return diff_one(args.scenario, sut=args.sut, protocol=args.protocol, layout=args.layout,
                    dp_attention=None if args.dp_attention is None
                    else args.dp_attention == "on", timeout=args.timeout)


def add_matrix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", action="append",
                   help="repeatable (default: every release from 0.5.9 on the package index); "
                        "'newest': the newest on the index, 'newest-judged': the newest the "
                        "committed matrix judged (the nightly runs the two side by side)")
    p.add_argument("--layout", action="append", help="repeatable (default: 1x2 2x2 1x1x2)")
    p.add_argument("--dp-attention", choices=["on", "off", "both"], default="both")
    p.add_argument("--examples", type=int, default=30, help="generated schedules per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=SGLANG_AGREEMENT_S,
                   help="seconds a rank waits at one agreement (every other wait derives from it)")
    p.add_argument("--shrink-s", type=float, default=90.0, help="shrinking budget per cell")
    p.add_argument("--replays", type=int, default=3,
                   help="replays of each divergence (generated or corpus) to confirm it (k/n)")
    p.add_argument("--out", default="cpcheck-out/matrix",
                   help="directory of the cells file (cells.json) and the replay files")
    p.add_argument("--replay-dir", default="", help="replay files here instead of --out")
    p.add_argument("--json", default="", help="the cells file (default: OUT/cells.json)")
    p.add_argument("--resume", action="store_true",
                   help="skip cells the cells file holds as finished (agree / diverge / flaky)")


def matrix_config(args: argparse.Namespace) -> MatrixConfig:
    from scenarios.campaigns.matrix import MatrixConfig, default_releases

    return MatrixConfig(
        releases=resolve_releases(args.release) if args.release else default_releases(),
        layouts=args.layout or list(MATRIX_LAYOUTS),
        dps={"on": [True], "off": [False], "both": [True, False]}[args.dp_attention],
        cells_file=Path(args.json or Path(args.out) / "cells.json"),
        replay_dir=args.replay_dir or args.out, examples=args.examples, seed=args.seed,
        timeout=args.timeout, shrink_s=args.shrink_s, replays=args.replays, resume=args.resume,
        command=" ".join(["cpcheck", *sys.argv[1:]]) if sys.argv else "cpcheck matrix")


def resolve_releases(names: list[str]) -> list[str]:
    """Release numbers as given, with `newest` and `newest-judged` looked up (once each);
    the same release named twice runs once."""
    from scenarios.store import matrix_cells
    from scenarios.sut.sglang import envs

    out: list[str] = []
    for name in names:
        if name == "newest":
            name = envs.newest_release()
        elif name == "newest-judged":
            judged = matrix_cells.newest_judged(matrix_cells.load(matrix_cells.COMMITTED))
            if judged is None:
                raise UsageError(f"--release newest-judged: {matrix_cells.COMMITTED.name} "
                                 "holds no judged cell")
            name = judged
        try:
            release_tuple(name)
        except ValueError:
            raise UsageError(f"--release {name}: not a release number (e.g. 0.5.23), "
                             "'newest' or 'newest-judged'") from None
        if name not in out:
            out.append(name)
    return out


def cmd_matrix(args: argparse.Namespace) -> int:
    from scenarios.campaigns.matrix import run_matrix

    return run_matrix(matrix_config(args))


def add_shard_argument(p: argparse.ArgumentParser) -> None:
    """`--shard I/N` (checked by `plan_shard`, so a bad one is one line and exit 2)."""
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="run part I of N of one nightly: the same --seed and --layout list on "
                        "every runner, each shard soaks its own derived seed and layout "
                        "(layout I of the comma list, round robin); `cpcheck report merge` "
                        "folds the N reports into one")
