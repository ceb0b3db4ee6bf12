"""`cpcheck agent --nnodes N --rdzv-endpoint HOST:PORT`: lend this host's ranks to a pool.

Run on every host but the first; the first runs `cpcheck run|explore|soak ... --nnodes N
--rdzv-endpoint HOST:PORT`, whose torchrun hosts the rendezvous. The agent joins each pool the
first host starts (a restarted pool too) until it is stopped (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from scenarios.cli.conventions import positive_float, positive_int
from scenarios.core.contract import CannotJudge, UsageError


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
    from scenarios.runner.multihost import MultiHostError, parse_endpoint, run_agent

    try:
        parse_endpoint(args.rdzv_endpoint)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.nnodes < 2:
        raise UsageError(f"--nnodes {args.nnodes}: an agent joins a pool of at least 2 hosts")
    try:
        return run_agent(args.nnodes, args.rdzv_endpoint, wait_s=args.wait, once=args.once,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    except MultiHostError as e:
        raise CannotJudge(str(e)) from None
