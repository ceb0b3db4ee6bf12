"""One long-lived rank worker, started by torchrun under :class:`~.torchrun_pool.RankPool`.

It joins the gloo world, builds every group of the layout once (same order on every rank),
connects back to the controller twice — a job connection served by the main thread and a control
connection served by a side thread — and then runs jobs ``(job_id, "module:function", payload)``
until told to exit. The control thread answers diagnosis requests while the main thread is
blocked inside a collective (gloo releases the GIL while it waits), and it exits the process if
the controller or the torchrun agent goes away, so no worker outlives its pool.

Run as ``python -m scenarios.runner.worker --pool-id=ID --layout=2x2 ...`` with the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) plus CPCHECK_POOL_ADDRESS
and CPCHECK_POOL_AUTHKEY from the controller.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from typing import TYPE_CHECKING, Any

from scenarios.core.layout import GROUP_KINDS, GroupKind, Layout

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

__all__ = ["Diagnosis", "RankContext", "RankGroups", "RankStatus", "main"]

#: where a rank runs ("auto" is CUDA where present); `cpcheck --device` and the pool take these
DEVICES = ("auto", "cpu", "cuda")
ENV_ADDRESS = "CPCHECK_POOL_ADDRESS"
ENV_AUTHKEY = "CPCHECK_POOL_AUTHKEY"

#: Exit codes of a worker that leaves by itself (torch elastic's failure record carries them).
EXIT_BAD_SETUP = 3
EXIT_ORPHANED = 4

_STACK_FRAMES = 8  # innermost frames per thread in a diagnosis: enough to see the blocking call


class RankStatus:
    """What the current job says it is doing; read by the control thread for diagnoses.

    Jobs call ``ctx.status.set("waiting on all_reduce MIN over [0, 1] (prefetch_hits)")`` before
    anything that may block, so a hang is reported in the job's own words instead of as a bare
    stack. Assignment of one tuple is atomic under the GIL, so no lock is needed.
    """

    def __init__(self) -> None:
        self._value: tuple[str, float] = ("idle", time.monotonic())

    def set(self, text: str) -> None:
        """Record what this rank is about to do (keep it one short line)."""
        self._value = (str(text), time.monotonic())

    def clear(self) -> None:
        """Back to the neutral "running" text (done by the worker at every job start)."""
        self.set("running")

    def get(self) -> tuple[str, float]:
        """``(text, seconds since it was set)``."""
        text, since = self._value
        return text, time.monotonic() - since

    def __str__(self) -> str:
        return self._value[0]


@dataclass
class RankGroups:
    """This rank's process groups (real gloo groups, single-rank ones included) and their ranks.

    ``tp`` is the full TP group (the pipeline stage); the attention TP and CP groups tile it.
    """

    attn_tp_group: ProcessGroup
    attn_cp_group: ProcessGroup
    tp_group: ProcessGroup
    pp_group: ProcessGroup
    attn_tp_ranks: tuple[int, ...]
    attn_cp_ranks: tuple[int, ...]
    tp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    world_group: ProcessGroup | None = None

    def get(self, kind: GroupKind | str) -> ProcessGroup:
        """Group by kind name: attn_tp, attn_cp, tp, pp or world."""
        if kind == "world":
            import torch.distributed as dist

            if self.world_group is not None:
                return self.world_group
            return dist.group.WORLD  # type: ignore[return-value]
        if kind not in GROUP_KINDS:
            raise KeyError(
                f"unknown group kind {kind!r}: expected world or {', '.join(GROUP_KINDS)}"
            )
        return getattr(self, f"{kind}_group")

    def ranks(self, kind: GroupKind | str, world_size: int | None = None) -> tuple[int, ...]:
        """Global ranks of the group of that kind (``world`` needs ``world_size``)."""
        if kind == "world":
            if world_size is None:
                import torch.distributed as dist

                world_size = dist.get_world_size()
            return tuple(range(world_size))
        if kind not in GROUP_KINDS:
            raise KeyError(
                f"unknown group kind {kind!r}: expected world or {', '.join(GROUP_KINDS)}"
            )
        return getattr(self, f"{kind}_ranks")


@dataclass
class RankContext:
    """Everything a job function gets besides its payload: ``function(ctx, payload)``.

    ``state`` survives across jobs on this worker (per-rank fixtures such as a cache instance);
    ``job``/``job_id`` name the job now running.
    """

    rank: int
    world_size: int
    local_rank: int
    layout: Layout
    device: torch.device
    groups: RankGroups
    status: RankStatus = field(default_factory=RankStatus)
    state: dict[str, Any] = field(default_factory=dict)
    job: str = ""
    job_id: int = -1


@dataclass
class Diagnosis:
    """A worker's answer to "what are you doing?" (sent over the control connection)."""

    rank: int
    pid: int
    job: str
    job_id: int
    busy: bool
    status: str
    status_age_s: float
    stacks: str

    def summary(self) -> str:
        """One line: the job's status text, or the innermost frame of the main thread."""
        if self.status not in ("running", "idle", ""):
            return f"{self.status} (for {self.status_age_s:.1f} s)"
        first = next((ln for ln in self.stacks.splitlines() if ln.startswith("  File")), "")
        return f"no status set; main thread at {first.strip() or '?'}"


# -- job resolution ------------------------------------------------------------------------------

_JOB_CACHE: dict[str, Callable[[RankContext, Any], Any]] = {}


def resolve_job(name: str) -> Callable[[RankContext, Any], Any]:
    """Import ``"package.module:function"`` (``function`` may be dotted), cached per worker."""
    fn = _JOB_CACHE.get(name)
    if fn is not None:
        return fn
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"job {name!r}: expected 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"job {name!r} is not callable")
    _JOB_CACHE[name] = obj
    return obj


# -- diagnosis -----------------------------------------------------------------------------------


def _stack_dump(main_ident: int | None) -> str:
    """Innermost frames of every Python thread, main thread first (why: show where it blocks)."""
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    order = sorted(frames, key=lambda ident: (ident != main_ident, ident))
    out: list[str] = []
    for ident in order:
        if ident == me:
            continue  # the control thread itself, answering this request
        stack = traceback.extract_stack(frames[ident])[-_STACK_FRAMES:]
        stack.reverse()  # innermost first: the blocking call is the first line read
        out.append(f"thread {names.get(ident, ident)} (innermost first):")
        for fr in stack:
            out.append(f'  File "{fr.filename}", line {fr.lineno}, in {fr.name}')
            if fr.line:
                out.append(f"    {fr.line.strip()}")
    return "\n".join(out)


class _Worker:
    """State shared by the job loop (main thread) and the control thread."""

    def __init__(self, ctx: RankContext, job_conn: Connection, ctl_conn: Connection) -> None:
        self.ctx = ctx
        self.job_conn = job_conn
        self.ctl_conn = ctl_conn
        self.busy = False
        self.exiting = False
        self.main_ident = threading.get_ident()
        self.parent_pid = os.getppid()

    def diagnose(self) -> Diagnosis:
        text, age = self.ctx.status.get()
        return Diagnosis(
            rank=self.ctx.rank,
            pid=os.getpid(),
            job=self.ctx.job,
            job_id=self.ctx.job_id,
            busy=self.busy,
            status=text,
            status_age_s=age,
            stacks=_stack_dump(self.main_ident),
        )

    def control_loop(self) -> None:
        """Serve diagnoses; exit the process when the controller or torchrun goes away."""
        while True:
            try:
                if self.ctl_conn.poll(0.5):
                    msg = self.ctl_conn.recv()
                    if msg[0] == "diagnose":
                        self.ctl_conn.send(("diagnosis", self.diagnose()))
                    elif msg[0] == "ping":
                        self.ctl_conn.send(("pong", os.getpid()))
            except (EOFError, OSError):
                if not self.exiting:
                    _hard_exit(0)  # controller gone: nothing left to serve
                return
            if os.getppid() != self.parent_pid:
                _hard_exit(EXIT_ORPHANED)  # torchrun agent died; do not linger

    def job_loop(self) -> None:
        """Receive jobs, run them, send results, until ``("exit",)`` or EOF."""
        ctx = self.ctx
        while True:
            try:
                msg = self.job_conn.recv()
            except (EOFError, OSError):
                return
            if msg[0] == "exit":
                return
            _, job_id, name, blob = msg
            ctx.job, ctx.job_id = name, job_id
            ctx.status.clear()
            self.busy = True
            try:
                fn = resolve_job(name)
                payload = pickle.loads(blob)
                result = fn(ctx, payload)
                reply: tuple[Any, ...] = (job_id, "ok", result)
            except Exception as exc:  # reported to the controller, which raises RankJobError
                reply = (job_id, "error", (traceback.format_exc(), _one_liner(exc)))
            except SystemExit as exc:  # a job calling sys.exit is a dying rank, and says so
                _hard_exit(exc.code if isinstance(exc.code, int) else 1)
            self.busy = False
            ctx.status.set("idle")
            try:
                self.job_conn.send(reply)
            except (EOFError, OSError):
                return
            except Exception as exc:  # result not picklable: say so instead of dying
                self.job_conn.send(
                    (
                        job_id,
                        "error",
                        (traceback.format_exc(), f"result not picklable: {_one_liner(exc)}"),
                    )
                )


def _one_liner(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _close_storage_clients() -> None:
    """On a graceful exit, close the Mooncake clients jobs kept open (storage_clients), so the
    master unmounts their segments now instead of placing objects on them until its TTL."""
    mod = sys.modules.get("scenarios.client.storage_clients")
    if mod is not None:
        try:
            mod.close_all()
        except Exception as exc:  # exiting anyway; say why the master may keep a segment
            print(f"cpcheck worker: closing storage clients failed: {exc}", file=sys.stderr)


def _hard_exit(code: int) -> None:
    """Leave now, without atexit hooks or ProcessGroup destructors that could block on peers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


# -- setup ---------------------------------------------------------------------------------------


def _build_groups(layout: Layout, rank: int, timeout: Any) -> RankGroups:
    """Create every group of the layout, in :meth:`Layout.all_groups` order, on every rank.

    Eager on purpose: ``new_group`` is collective over the whole world, so building a group on a
    job's first use would hang every job that touches a group on some ranks only (a rank that
    all-reduces over its own single-rank group, a rank stuck alone in a collective) instead of
    running or timing out as it does now. It costs 10-20 ms of a start of several seconds
    (1x2 and 2x2, measured with this box shared).
    """
    import torch.distributed as dist

    mine: dict[str, tuple[Any, tuple[int, ...]]] = {}
    for kind, ranks in layout.all_groups():
        pg = dist.new_group(list(ranks), backend="gloo", timeout=timeout)
        if rank in ranks:
            mine[kind] = (pg, ranks)
    return RankGroups(
        attn_tp_group=mine["attn_tp"][0],
        attn_cp_group=mine["attn_cp"][0],
        tp_group=mine["tp"][0],
        pp_group=mine["pp"][0],
        attn_tp_ranks=mine["attn_tp"][1],
        attn_cp_ranks=mine["attn_cp"][1],
        tp_ranks=mine["tp"][1],
        pp_ranks=mine["pp"][1],
        world_group=dist.group.WORLD,
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scenarios.runner.worker")
    p.add_argument("--pool-id", required=True, help="controller's pool id (for pgrep and logs)")
    p.add_argument("--layout", required=True)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--collective-timeout-s", type=float, default=120.0)
    p.add_argument("--placement", default="torchrun",
                   help="which layout rank each torchrun rank takes (scenarios/runner/placement.py)")
    return p.parse_args(argv)


def layout_rank(layout: Layout, placement: str, torchrun_rank: int) -> int:
    """This worker's layout rank: torchrun's rank through the pool's placement (hosts hold
    ``LOCAL_WORLD_SIZE`` ranks each, torchrun numbering them node by node)."""
    if placement == "torchrun":
        return torchrun_rank
    from scenarios.runner.placement import make_placement

    per = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size))
    return make_placement(placement, layout, layout.world_size // per).layout_rank(torchrun_rank)


def main(argv: list[str] | None = None) -> int:
    """Worker entry point; returns the process exit code.

    Runs under torch elastic's ``@record``: an exception that escapes writes the error file
    torchrun named in ``TORCHELASTIC_ERROR_FILE``, so its traceback reaches the controller's
    ``RankPoolStartError`` / ``RankDiedError`` through the launcher's failure record.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    code = record(_main)(argv)
    return 0 if code is None else code


def _main(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    try:
        torchrun_rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", torchrun_rank))
        # one address, or one per host (a pool whose other hosts reach it through proxies)
        addresses = os.environ[ENV_ADDRESS].split(",")
        node = int(os.environ.get("GROUP_RANK", 0))
        host, port = addresses[node if len(addresses) > 1 else 0].rsplit(":", 1)
        authkey = bytes.fromhex(os.environ[ENV_AUTHKEY])
    except (KeyError, ValueError) as exc:
        print(f"cpcheck worker: missing torchrun/controller environment: {exc}", file=sys.stderr)
        return EXIT_BAD_SETUP
    layout = Layout.parse(args.layout, max_world=None)
    if layout.world_size != world_size:
        print(
            f"cpcheck worker: layout '{layout}' has {layout.world_size} ranks but "
            f"WORLD_SIZE={world_size}",
            file=sys.stderr,
        )
        return EXIT_BAD_SETUP
    try:
        rank = layout_rank(layout, args.placement, torchrun_rank)
    except ValueError as exc:
        print(f"cpcheck worker: {exc}", file=sys.stderr)
        return EXIT_BAD_SETUP

    from datetime import timedelta

    import torch
    import torch.distributed as dist

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            print("cpcheck worker: device 'cuda' requested but no GPU is visible", file=sys.stderr)
            return EXIT_BAD_SETUP
        index = local_rank % torch.cuda.device_count()  # several ranks may share one GPU
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")

    timeout = timedelta(seconds=args.collective_timeout_s)
    # under the layout rank: every group, job and record speaks layout ranks on any host
    dist.init_process_group("gloo", timeout=timeout, rank=rank, world_size=world_size)
    groups = _build_groups(layout, rank, timeout)
    ctx = RankContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        layout=layout,
        device=device,
        groups=groups,
    )

    address = (host, int(port))
    job_conn = Client(address, authkey=authkey)
    job_conn.send(("hello", "job", rank, os.getpid(), str(device)))
    ctl_conn = Client(address, authkey=authkey)
    ctl_conn.send(("hello", "ctl", rank, os.getpid(), str(device)))

    worker = _Worker(ctx, job_conn, ctl_conn)
    threading.Thread(target=worker.control_loop, name="cpcheck-control", daemon=True).start()
    worker.job_loop()
    worker.exiting = True
    _close_storage_clients()
    _hard_exit(0)
    return 0  # pragma: no cover - _hard_exit does not return


if __name__ == "__main__":
    # Run the copy imported under its real name, so objects this worker pickles (Diagnosis)
    # refer to scenarios.runner.worker, not to __main__, and the controller can load them.
    from scenarios.runner import worker as _worker

    sys.exit(_worker.main())
