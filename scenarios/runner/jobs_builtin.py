"""Tiny job functions for pool health checks and for the pool's own tests.

Each is ``function(ctx, payload)``; run one with
``pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=10)``. Payloads are plain dicts
so they pickle anywhere. Group names accepted where a ``group`` is asked for: ``world``,
``attn_tp``, ``attn_cp``, ``tp``, ``pp``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scenarios.runner.worker import RankContext

__all__ = [
    "all_reduce_int",
    "allreduce_min",
    "allreduce_min_steps",
    "exit_on_rank",
    "group_ranks",
    "mark_preloaded",
    "ping",
    "raise_before_collective_on_rank",
    "raise_on_rank",
    "signal_on_rank",
    "sleep_forever_on_rank",
    "whoami",
]

#: the pid of the process that ran `mark_preloaded` (a pool's zygote), inherited by its forks
PRELOADED_BY: list[int] = []


def all_reduce_int(ctx: RankContext, group: str, value: int, op: str = "MIN", tag: str = "") -> int:
    """All-reduce one int64 over ``group``, saying so in ``ctx.status`` first (for diagnoses)."""
    import torch
    import torch.distributed as dist

    ops = {"MIN": dist.ReduceOp.MIN, "MAX": dist.ReduceOp.MAX, "SUM": dist.ReduceOp.SUM}
    ranks = list(ctx.groups.ranks(group, ctx.world_size))
    ctx.status.set(f"waiting on all_reduce {op} over {ranks} ({tag or group})")
    t = torch.tensor([int(value)], dtype=torch.int64)  # gloo sync groups take CPU tensors
    dist.all_reduce(t, op=ops[op], group=ctx.groups.get(group))
    ctx.status.set(f"done all_reduce {op} over {ranks} ({tag or group})")
    return int(t.item())


def ping(ctx: RankContext, payload: Any = None) -> dict[str, Any]:
    """Who am I: rank, pid, device, world size (a health check that touches no collective)."""
    return {
        "rank": ctx.rank,
        "pid": os.getpid(),
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "job_id": ctx.job_id,
        # which host and agent this rank runs on (a pool over hosts places ranks by --placement)
        "node": int(os.environ.get("GROUP_RANK", 0)),
        "torchrun_rank": int(os.environ.get("RANK", ctx.rank)),
        "hostname": socket.gethostname(),
        "agent_pid": os.getppid(),
    }


def allreduce_min(ctx: RankContext, payload: dict[str, Any]) -> int:
    """MIN over ``payload["group"]`` of ``payload["values"][rank]`` (or ``payload["value"]``)."""
    values = payload.get("values")
    value = values[ctx.rank] if values is not None else payload.get("value", ctx.rank)
    return all_reduce_int(ctx, payload.get("group", "world"), value, "MIN", payload.get("tag", ""))


def allreduce_min_steps(ctx: RankContext, payload: dict[str, Any]) -> int:
    """MIN of ``values[rank]`` over each group of ``payload["groups"]`` in turn.

    ``{"groups": ["attn_cp", "attn_tp"], ...}`` is the protocol's two-step agreement, which
    must equal the global MIN over the TP group.
    """
    value = payload["values"][ctx.rank]
    for group in payload["groups"]:
        value = all_reduce_int(ctx, group, value, "MIN", payload.get("tag", ""))
    return value


def group_ranks(ctx: RankContext, payload: Any = None) -> dict[str, list[int]]:
    """Rank lists of this rank's groups as torch sees them (checks the worker's wiring)."""
    import torch.distributed as dist

    return {
        kind: list(dist.get_process_group_ranks(ctx.groups.get(kind)))
        for kind in ("attn_tp", "attn_cp", "tp", "pp")
    }


def sleep_forever_on_rank(ctx: RankContext, payload: dict[str, Any]) -> int:
    """Rank ``payload["rank"]`` enters an all-reduce its peers never enter; the others return.

    The stuck rank blocks until the gloo collective timeout, which is what a real
    collective-order divergence looks like; the pool's job timeout should fire first.
    """
    if ctx.rank == payload.get("rank", 0):
        all_reduce_int(ctx, payload.get("group", "world"), 1, "MIN", payload.get("tag", "hang"))
    return ctx.rank


def raise_on_rank(ctx: RankContext, payload: dict[str, Any]) -> int:
    """Raise ``RuntimeError(payload["message"])`` on rank ``payload["rank"]`` (or ranks)."""
    target = payload.get("rank", 0)
    ranks = target if isinstance(target, (list, tuple, set)) else [target]
    if ctx.rank in ranks:
        raise RuntimeError(payload.get("message", f"boom on rank {ctx.rank}"))
    return ctx.rank


def raise_before_collective_on_rank(ctx: RankContext, payload: dict[str, Any]) -> int:
    """Rank ``payload["rank"]`` raises; its peers then wait in an all-reduce it never enters."""
    if ctx.rank == payload.get("rank", 0):
        raise RuntimeError(payload.get("message", f"boom on rank {ctx.rank}"))
    return all_reduce_int(ctx, payload.get("group", "world"), 1, "MIN", "peer of a failed rank")


def exit_on_rank(ctx: RankContext, payload: dict[str, Any]) -> int:
    """``os._exit(payload["code"])`` on rank ``payload["rank"]``: a worker dying mid-job."""
    if ctx.rank == payload.get("rank", 0):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(payload.get("code", 3)))
    return ctx.rank


def signal_on_rank(ctx: RankContext, payload: dict[str, Any]) -> int:
    """Rank ``payload["rank"]`` sends itself ``payload["signal"]`` (default SIGKILL) mid-job."""
    if ctx.rank == payload.get("rank", 0):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), int(payload.get("signal", signal.SIGKILL)))
        signal.pause()  # a signal that does not kill at once still never lets the job return
    return ctx.rank


def mark_preloaded() -> None:
    """A pool's ``preload`` for tests: records the zygote's pid, which every forked rank sees."""
    PRELOADED_BY.append(os.getpid())


def whoami(ctx: RankContext, payload: Any = None) -> dict[str, Any]:
    """What a rank sees of itself: its context, torchrun's environment, the process group, its
    pid and parent (a rank forked by a zygote reports the zygote and what it preloaded)."""
    import torch.distributed as dist

    return {
        "rank": ctx.rank,
        "env_rank": int(os.environ["RANK"]),
        "env_local_rank": int(os.environ["LOCAL_RANK"]),
        "env_world_size": int(os.environ["WORLD_SIZE"]),
        "dist_rank": dist.get_rank(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "preloaded_by": list(PRELOADED_BY),
        "error_file": os.environ.get("TORCHELASTIC_ERROR_FILE", ""),
    }
