"""`cpcheck agent --nnodes N --rdzv-endpoint HOST:PORT`: lend this host's ranks to a pool.

Run on every host but the first; the first runs `cpcheck run|explore|soak ... --nnodes N
--rdzv-endpoint HOST:PORT`, whose torchrun hosts the rendezvous. The agent joins each pool the
first host starts (a restarted pool too) until it is stopped (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from scenarios.cli.conventions import positive_float, positive_int
from scenarios.core.errors import UsageError


def add_agent_subcommand(sub: Any, **sub_kw: Any) -> None:
    p = sub.add_parser("agent", help="lend this host's ranks to a pool started on another host",
                       **sub_kw)
    p.add_argument("--nnodes", type=positive_int, required=True,
                   help="hosts in the pool, the first one included")
    p.add_argument("--rdzv-endpoint", required=True, metavar="HOST:PORT",
                   help="torchrun's c10d rendezvous, hosted by the first host")
    p.add_argument("--wait", type=positive_float, default=600.0,
                   help="seconds to wait for the first host's pool before giving up")
    p.add_argument("--once", action="store_true", help="serve one pool, then exit")


def cmd_agent(args: argparse.Namespace) -> int:
    from scenarios.runner.multihost import parse_endpoint, run_agent

    try:
        parse_endpoint(args.rdzv_endpoint)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.nnodes < 2:
        raise UsageError(f"--nnodes {args.nnodes}: an agent joins a pool of at least 2 hosts")
    return run_agent(args.nnodes, args.rdzv_endpoint, wait_s=args.wait, once=args.once,
                     log=lambda line: print(line, file=sys.stderr, flush=True))


def add_multihost_flags(p: argparse.ArgumentParser) -> None:
    """`--nnodes N --rdzv-endpoint HOST:PORT` of run / replay / explore / soak (torchrun mode)."""
    p.add_argument("--nnodes", type=positive_int, default=1,
                   help="hosts the ranks spread over (torchrun mode; each other host runs "
                        "`cpcheck agent` with the same two flags)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", default=None,
                   help="torchrun's c10d rendezvous, hosted here (with --nnodes > 1)")
    p.add_argument("--placement", default=None, metavar="NAME",
                   help="which host each rank lives on (with --nnodes > 1): torchrun (its "
                        "node-by-node order, the default), tp-local / cp-local (each attention-"
                        "TP / CP group on one host), spread (each group over several hosts)")


def multihost_options(args: argparse.Namespace, mode: str | None,
                      layouts: Sequence[str] = ()) -> dict[str, Any]:
    """The Executor's `nnodes` / `rdzv_endpoint`, or a UsageError before any work."""
    from scenarios.runner.multihost import parse_endpoint

    nnodes = getattr(args, "nnodes", 1) or 1
    endpoint = getattr(args, "rdzv_endpoint", None)
    placement = getattr(args, "placement", None)
    if nnodes == 1:
        if endpoint:
            raise UsageError("--rdzv-endpoint needs --nnodes N > 1")
        if placement:
            raise UsageError(f"--placement {placement}: placing ranks on hosts needs --nnodes N > 1")
        return {}
    if mode != "torchrun":
        raise UsageError(f"--nnodes {nnodes}: ranks on several hosts need --mode torchrun")
    if not endpoint:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT")
    try:
        parse_endpoint(endpoint)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out: dict[str, Any] = {"nnodes": nnodes, "rdzv_endpoint": endpoint}
    if placement:
        from scenarios.runner.placement import make_placement

        for layout in layouts:  # a group larger than a host: exit 2 before any work
            make_placement(placement, layout, nnodes)
        out["placement"] = placement
    return out
