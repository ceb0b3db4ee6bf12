"""`cpcheck soak` on the command line: its flags, and the SoakConfig they build.

The only place the soak meets argparse: everything below reads a `SoakConfig`.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from reference.api import STORAGE_BACKENDS
from scenarios.campaigns.shard import plan_shard
from scenarios.cli.agent import add_multihost_flags, multihost_options
from scenarios.cli.campaign_args import add_shard_argument
from scenarios.cli.conventions import (
    add_output_flags,
    check_device,
    check_variant_arg,
    master_address,
    positive_float,
    positive_int,
    variant_help,
)
from scenarios.cli.protocol_args import add_protocol_arguments, protocol_changes
from scenarios.core.errors import UsageError
from scenarios.core.soak_config import MIN_RUNS_SLACK, SoakConfig
from scenarios.core.suts import check, is_sglang, sglang_version
from scenarios.core.timeouts import DEFAULT_AGREEMENT_S
from scenarios.runner.worker import DEVICES
from scenarios.sut.reference_executor import MODES


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpcheck soak` (cli.py builds the subparser and calls this)."""
    p.add_argument("--layout", default="1x2",
                   help="TPxCP[xPP] (default 1x2); with --shard, a comma list")
    p.add_argument("--backend", choices=STORAGE_BACKENDS, default="memory")
    p.add_argument("--minutes", type=positive_float, default=1.0,
                   help="wall-clock budget (default 1)")
    p.add_argument("--min-runs", type=positive_int, default=None, metavar="N",
                   help="go on past --minutes until N runs were judged (at most "
                        f"{MIN_RUNS_SLACK}x the budget): a run count that does not depend on "
                        "how loaded the machine is (tests, bisecting)")
    p.add_argument("--variant", default="fixed", help=variant_help("fixed or a known-bad variant"))
    p.add_argument("--faults", default="", metavar="LIST",
                   help="comma list of slow_rank,storage_latency,storage_errors,master_restart,"
                        "kill_rank; over several hosts also stop_agent,kill_agent,net_latency,"
                        "net_drop (default: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="pin the run (default: a fresh random seed, printed and in the report)")
    p.add_argument("--mode", choices=MODES, default="inprocess",
                   help="inprocess (ranks as threads) or torchrun (faults act on the real "
                        "worker processes and master)")
    p.add_argument("--out", default="cpcheck-out/soak",
                   help="each soak writes a fresh run dir here (TIMESTAMP-seedN: report, plots, "
                        "replay, logs) and points OUT/latest at it")
    p.add_argument("--mooncake-master", metavar="HOST:PORT", default="", type=master_address,
                   help="use this Mooncake master instead of starting one (--backend mooncake)")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_AGREEMENT_S,
                   help="seconds a rank waits for its peers at one agreement; every other "
                   "wait of a run (collective, whole run, SGLang set-up) is a multiple of it")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--sut", default="reference",
                   help="reference or sglang==VERSION (a release runs gated under torchrun and "
                        "takes its faults from the Schedules; variants, protocol and faults "
                        "flags are the reference's)")
    p.add_argument("--differential", action="store_true",
                   help="with --sut sglang==V: differential exploration (the reference profile "
                        "of V against V) for the wall-clock budget, a fresh seed per round; "
                        "stops at the first confirmed difference")
    add_shard_argument(p)
    add_multihost_flags(p)
    add_protocol_arguments(p)
    add_output_flags(p)


def soak_config(args: argparse.Namespace, argv: list[str] | None = None) -> SoakConfig:
    """The SoakConfig of parsed flags; UsageError (exit 2) for what argparse cannot see."""
    from scenarios.core.layout import Layout

    if args.mooncake_master and args.backend != "mooncake":
        raise UsageError("--mooncake-master needs --backend mooncake (it would be ignored)")
    # a shard of a nightly soaks its own seed and layout of the lists given (campaigns/shard.py)
    plan = plan_shard(args.layout, args.seed if args.seed is not None
                      else random.randrange(1 << 31), args.shard)
    layout = str(Layout.parse(plan.layout))
    check_variant_arg(args.variant)
    check_device(args.device)
    changes = protocol_changes(args)
    if is_sglang(check(args.sut)):
        _check_release_soak(args, changes)
    return SoakConfig(
        layout=layout, backend=args.backend, minutes=args.minutes, min_runs=args.min_runs or 0,
        variant=args.variant,
        faults=args.faults, seed=plan.seed, mode=args.mode, out=Path(args.out),
        shard=plan.to_dict() if args.shard else None,
        pool_options=multihost_options(args, args.mode, [layout]),  # bad flags: exit 2 before any work
        mooncake_master=args.mooncake_master, timeout=args.timeout, device=args.device,
        protocol_changes=changes, sut=args.sut, json=args.json, verbose=args.verbose,
        argv=tuple(["cpcheck", *(argv if argv is not None else sys.argv[1:])]))


def _check_release_soak(args: argparse.Namespace, changes: dict) -> None:
    """What a soak of an SGLang release cannot take (exit 2, naming it)."""
    if args.variant != "fixed":
        raise UsageError(f"--variant {args.variant}: known-bad variants are the reference's; "
                         f"--sut {args.sut} runs the release as it is")
    if "protocol" in changes:
        raise UsageError(f"--protocol: --sut {args.sut} is its own protocol")
    kinds = [k for k in args.faults.split(",") if k.strip()]
    if kinds:
        raise UsageError(f"--faults {','.join(kinds)}: not for --sut {args.sut}: a release's "
                         "IO threads run under the harness's gates, so its faults come from "
                         "the Schedules (storage errors in the soak's gated chunks)")
    if getattr(args, "nnodes", 1) not in (None, 1):
        raise UsageError(f"--nnodes: --sut {args.sut} runs on one host")


def cmd_soak(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from scenarios.campaigns.soak import run_soak

    if args.differential:
        return _differential_soak(args)

    return run_soak(soak_config(args, argv))


def _differential_soak(args: argparse.Namespace) -> int:
    """`soak --differential`: rounds of differential exploration until --minutes are spent.
    Bad input (no release, faults, another backend, a shard) is exit 2 before any work."""
    from scenarios.campaigns.differential import differential_soak
    from scenarios.core.layout import Layout

    version = sglang_version(args.sut)
    if version is None:
        raise UsageError("--differential needs --sut sglang==VERSION")
    if args.backend != "memory":
        raise UsageError(f"--differential compares runs on the memory backend, not "
                         f"{args.backend!r}")
    if args.faults.strip() or args.shard or args.variant != "fixed":
        raise UsageError("--differential takes no --faults, --shard or --variant (the "
                         "Schedules carry their own storage faults)")
    layout = str(Layout.parse(args.layout))
    changes = protocol_changes(args)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    return differential_soak(version, layout, args.minutes, seed, Path(args.out),
                             protocol=changes.get("protocol"), timeout=args.timeout,
                             dp_attention=changes.get("dp_attention", True))
