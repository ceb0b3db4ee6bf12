"""A pool of long-lived rank workers under torchrun that runs any job function on every rank.

Why a pool: starting torchrun and importing torch on every rank costs seconds, a job round trip
costs about a millisecond, and a property-based search runs hundreds of examples.

Lifecycle: :meth:`RankPool.start` launches ``python -m torch.distributed.run ... -m
scenarios.runner.worker`` in its own session, each worker connects back twice (job + control
connection) over ``multiprocessing.connection`` with a random authkey. :meth:`RankPool.run` sends
one job to every rank and returns the results in rank order. A job error on some rank raises
:class:`RankJobError` and keeps the pool. A timeout (:class:`RankTimeoutError`, with every
stuck rank's own status line and stacks), a dead rank (:class:`RankDiedError`) or a
KeyboardInterrupt tear the pool down: every worker and torchrun are killed and waited for. The
pool does NOT restart by itself (per-rank state set up by earlier jobs would silently vanish);
``run`` then raises :class:`PoolNotRunningError` until you call :meth:`RankPool.start` again.

Ports: torchrun's rendezvous store binds ``127.0.0.1:0`` and the controller's listener binds
port 0 too, so the kernel hands out free ports atomically and concurrent pools (pytest-xdist)
cannot collide; an explicit ``port=`` is checked up front and bound with ``is_host=1`` so a pool
never silently joins another pool's rendezvous.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from pathlib import Path
from typing import Any, Literal, NoReturn

from scenarios.layout import Layout
from scenarios.runner.worker import ENV_ADDRESS, ENV_AUTHKEY, Diagnosis

__all__ = [
    "PoolNotRunningError",
    "RankDiedError",
    "RankInfo",
    "RankJobError",
    "RankPool",
    "RankPoolConfigError",
    "RankPoolError",
    "RankPoolStartError",
    "RankTimeoutError",
    "job_name",
    "max_ranks_here",
    "pool_processes",
]

Device = Literal["auto", "cpu", "cuda"]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_WORKER_MODULE = "scenarios.runner.worker"
_POLL_S = 0.5  # slice for waits, so a dead torchrun is noticed while results are awaited
_ERROR_GRACE_S = 5.0  # after a rank errors, how long the other ranks get to finish
_DIAGNOSE_TIMEOUT_S = 3.0
_LOG_TAIL_LINES = 25


# -- errors --------------------------------------------------------------------------------------


class RankPoolError(RuntimeError):
    """Base of every pool failure."""


class RankPoolConfigError(RankPoolError, ValueError):
    """Bad pool arguments (too many ranks for this machine, port in use, no GPU)."""


class RankPoolStartError(RankPoolError):
    """torchrun or a worker failed before every rank connected; the message ends with the log."""


class PoolNotRunningError(RankPoolError):
    """``run`` on a pool that was never started, was closed, or was torn down by a failure."""


class RankJobError(RankPoolError):
    """The job raised on one or more ranks; the pool stays usable if every rank replied."""

    def __init__(self, message: str, job: str, failures: dict[int, tuple[str, str]]) -> None:
        super().__init__(message)
        self.job = job
        #: rank -> (one-line exception, full formatted traceback)
        self.failures = failures

    @property
    def ranks(self) -> list[int]:
        return sorted(self.failures)


class RankTimeoutError(RankPoolError):
    """Some ranks did not finish in time; ``diagnoses`` holds what each rank said it was doing."""

    def __init__(
        self, message: str, job: str, ranks: list[int], diagnoses: dict[int, Diagnosis | str]
    ) -> None:
        super().__init__(message)
        self.job = job
        self.ranks = ranks
        self.diagnoses = diagnoses


class RankDiedError(RankPoolError):
    """A worker process (or torchrun itself, ``rank=None``) exited; the pool was torn down."""

    def __init__(self, message: str, rank: int | None, exitcode: int | None) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11: pytest prints notes under the message
        exc.add_note(note)


# -- helpers -------------------------------------------------------------------------------------


def max_ranks_here() -> int:
    """Cap on ranks one pool may start here: 4 per usable CPU core (gloo ranks mostly wait)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return 4 * cores


def job_name(job: str | Callable[..., Any]) -> str:
    """``"module:function"`` for a job given as a string or as an importable function."""
    if isinstance(job, str):
        if ":" not in job:
            raise ValueError(f"job {job!r}: expected 'package.module:function'")
        return job
    module = getattr(job, "__module__", None)
    qualname = getattr(job, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
        raise ValueError(
            f"job {job!r} is not importable by the workers; "
            "define it at module level in an importable module or pass 'module:function'"
        )
    return f"{module}:{qualname}"


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _bind_listener(attempts: int = 5) -> socket.socket:
    """Listening socket on a kernel-chosen free port of 127.0.0.1 (retry on EADDRINUSE)."""
    last: OSError | None = None
    for _ in range(attempts):
        try:
            return socket.create_server(("127.0.0.1", 0), backlog=64)
        except OSError as exc:  # pragma: no cover - only under ephemeral-port exhaustion
            last = exc
            time.sleep(0.05)
    raise RankPoolStartError(f"cannot bind a free port on 127.0.0.1: {last}")


def _set_rcvtimeo(sock: socket.socket, seconds: float) -> None:
    """Kernel-level receive timeout, which still applies after the fd moves to a Connection."""
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) from /proc (Linux)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 2:
            table[int(entry)] = (int(rest[1]), rest[0])
    return table


def _descendants(root: int) -> list[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cmdline_has(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return token.encode() in f.read()
    except OSError:
        return False


def pool_processes(pool_id: str) -> list[int]:
    """Live (non-zombie) processes whose command line carries this pool id: torchrun + workers."""
    live = []
    for pid, (_, state) in _proc_table().items():
        if state != "Z" and pid != os.getpid() and _cmdline_has(pid, f"--pool-id={pool_id}"):
            live.append(pid)
    return sorted(live)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


_FAILURE_RE = re.compile(
    r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)"
)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True)
class RankInfo:
    """What a worker said in its hello."""

    rank: int
    pid: int
    device: str


class _Rank:
    def __init__(self, info: RankInfo) -> None:
        self.info = info
        self.job_conn: Connection | None = None
        self.ctl_conn: Connection | None = None


# -- the pool ------------------------------------------------------------------------------------


class RankPool:
    """Long-lived torchrun workers for one layout; ``run`` executes a job on every rank.

    >>> with RankPool("2x2") as pool:                                     # doctest: +SKIP
    ...     pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=10)
    """

    def __init__(
        self,
        layout: Layout | str,
        *,
        device: Device = "auto",
        collective_timeout_s: float = 120.0,
        start_timeout_s: float = 120.0,
        env: Mapping[str, str | None] | None = None,
        port: int | None = None,
        max_ranks: int | None = None,
        error_grace_s: float = _ERROR_GRACE_S,
        log_dir: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.layout = Layout.parse(layout, max_world=None)
        cap = max_ranks if max_ranks is not None else max_ranks_here()
        if self.layout.world_size > cap:
            how = "max_ranks" if max_ranks is not None else f"4 x {cap // 4} CPU cores"
            raise RankPoolConfigError(
                f"layout '{self.layout}' needs {self.layout.world_size} ranks, more than this "
                f"machine can run (cap {cap} = {how}; pass max_ranks= to override)"
            )
        if device not in ("auto", "cpu", "cuda"):
            raise RankPoolConfigError(f"device {device!r}: expected 'auto', 'cpu' or 'cuda'")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise RankPoolConfigError(
                    "device 'cuda' requested but no GPU is visible here "
                    "(torch.cuda.is_available() is False); use device='auto' or 'cpu'"
                )
        if port is not None and not 0 < port < 65536:
            raise RankPoolConfigError(f"port {port}: expected 1..65535 or None for a free port")
        if collective_timeout_s <= 0 or start_timeout_s <= 0:
            raise RankPoolConfigError("collective_timeout_s and start_timeout_s must be > 0")
        self.device: Device = device
        self.collective_timeout_s = float(collective_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.env = dict(env or {})
        self.port = port
        self.error_grace_s = float(error_grace_s)
        self.keep_log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.python = python

        self.pool_id = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._ranks: list[_Rank] = []
        self._log_dir: str | None = None
        self._tmp_dir: str | None = None  # TMPDIR of torchrun and its workers, removed at teardown
        self._log_file: Any = None
        self._log_name = "torchrun.log"
        self._job_ids = itertools.count(1)
        self._atexit_registered = False
        self.last_teardown_reason = ""

    # -- properties ------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def running(self) -> bool:
        """True between a successful ``start`` and ``close`` or a failure that tore it down."""
        return self._proc is not None and len(self._ranks) == self.world_size

    @property
    def ranks(self) -> list[RankInfo]:
        """Per-rank hello info (pid, device) of the running pool, in rank order."""
        return [r.info for r in self._ranks]

    @property
    def torchrun_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """torchrun + worker stdout/stderr; deleted at teardown unless ``log_dir`` was given."""
        return Path(self._log_dir, self._log_name) if self._log_dir else None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        try:
            data = path.read_bytes()[-64_000:].decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])

    # -- start -----------------------------------------------------------------------------

    def start(self) -> RankPool:
        """Launch torchrun and wait until every rank has built its groups and connected.

        Also restarts a pool torn down by a failure. Returns ``self`` for chaining.
        """
        if self.running:
            return self
        self._teardown(graceful=False, reason="restart")  # leftovers of a half-dead pool
        if self.port is not None and _port_in_use(self.port):
            raise RankPoolConfigError(
                f"port {self.port} on 127.0.0.1 is already in use; pass port=None to pick a free one"
            )
        try:
            self._launch()
            self._accept_all()
        except BaseException as exc:
            tail = self.log_tail()
            self._teardown(graceful=False, reason=f"start failed: {exc}")
            if self.port is not None and re.search(r"EADDRINUSE|address already in use", tail):
                raise RankPoolConfigError(  # lost a race for the explicit port
                    f"port {self.port} on 127.0.0.1 is already in use; "
                    "pass port=None to pick a free one"
                ) from exc
            if isinstance(exc, RankPoolStartError) and tail:
                _add_note(exc, "torchrun log (last lines):\n" + tail)
            raise
        return self

    def _launch(self) -> None:
        self.pool_id = secrets.token_hex(6)
        authkey = secrets.token_bytes(32)
        self._authkey = authkey
        self._listener = _bind_listener()
        self._listener.settimeout(_POLL_S)
        host, port = self._listener.getsockname()[:2]
        if self.keep_log_dir is not None:
            os.makedirs(self.keep_log_dir, exist_ok=True)
            self._log_dir = self.keep_log_dir
            name = f"torchrun-{self.pool_id}.log"
        else:
            self._log_dir = tempfile.mkdtemp(prefix=f"cpcheck-pool-{self.pool_id}-")
            name = "torchrun.log"
        self._log_name = name
        self._log_file = open(os.path.join(self._log_dir, name), "wb")  # noqa: SIM115

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
            env["GLOO_SOCKET_IFNAME"] = "lo"  # single host: never depend on hostname resolution
        env.setdefault("OMP_NUM_THREADS", "1")
        # torchrun's agent makes torchelastic_* temp dirs and removes them only when it exits
        # normally; under a TMPDIR of the pool's own, a SIGKILLed agent leaves nothing behind
        self._tmp_dir = tempfile.mkdtemp(prefix=f"cpcheck-pool-{self.pool_id}-tmp-")
        env["TMPDIR"] = self._tmp_dir
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        env[ENV_ADDRESS] = f"{host}:{port}"
        env[ENV_AUTHKEY] = authkey.hex()

        cmd = [
            self.python,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc-per-node={self.world_size}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{self.port or 0}",
            "--rdzv-conf=is_host=1",
            "--local-addr=127.0.0.1",
            "--max-restarts=0",
            "--monitor-interval=0.1",
            "-m",
            _WORKER_MODULE,
            f"--pool-id={self.pool_id}",
            f"--layout={self.layout}",
            f"--device={self.device}",
            f"--collective-timeout-s={self.collective_timeout_s}",
        ]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: killpg reaches torchrun, not us
        )
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True

    def _accept_all(self) -> None:
        assert self._listener is not None and self._proc is not None
        n = self.world_size
        deadline = time.monotonic() + self.start_timeout_s
        job: dict[int, tuple[Connection, RankInfo]] = {}
        ctl: dict[int, Connection] = {}
        try:
            while len(job) < n or len(ctl) < n:
                code = self._proc.poll()
                if code is not None:
                    raise RankPoolStartError(
                        f"pool '{self.layout}' failed to start: torchrun exited with code {code} "
                        f"after {len(job)} of {n} ranks connected"
                    )
                if time.monotonic() > deadline:
                    missing = sorted(set(range(n)) - set(job))
                    raise RankPoolStartError(
                        f"pool '{self.layout}' did not start in {self.start_timeout_s:g} s: "
                        f"{len(job)} of {n} ranks connected (missing {missing})"
                    )
                try:
                    sock, _ = self._listener.accept()
                except TimeoutError:
                    continue
                conn = self._handshake(sock)
                if conn is None:
                    continue
                try:
                    hello = conn.recv() if conn.poll(10.0) else None
                except Exception:  # died mid-hello; torchrun's exit is noticed on the next loop
                    hello = None
                if not (isinstance(hello, tuple) and len(hello) == 5 and hello[0] == "hello"):
                    conn.close()
                    continue
                _, kind, rank, pid, device = hello
                target = job if kind == "job" else ctl
                if not 0 <= rank < n or rank in target:
                    conn.close()
                    raise RankPoolStartError(f"unexpected hello from rank {rank} (pid {pid})")
                if kind == "job":
                    job[rank] = (conn, RankInfo(rank, pid, device))
                else:
                    ctl[rank] = conn
        except BaseException:
            for conn in [c for c, _ in job.values()] + list(ctl.values()):
                conn.close()
            raise
        ranks = []
        for r in range(n):
            entry = _Rank(job[r][1])
            entry.job_conn, entry.ctl_conn = job[r][0], ctl[r]
            ranks.append(entry)
        self._ranks = ranks
        self._listener.close()  # every rank is in; free the port now
        self._listener = None

    def _handshake(self, sock: socket.socket) -> Connection | None:
        """multiprocessing's authkey challenge, both ways (what ``Listener.accept`` does)."""
        sock.setblocking(True)
        _set_rcvtimeo(sock, 10.0)  # a stray client that never answers cannot wedge start()
        conn = Connection(sock.detach())
        try:
            deliver_challenge(conn, self._authkey)
            answer_challenge(conn, self._authkey)
        except Exception:
            conn.close()
            return None
        with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as dup:
            _set_rcvtimeo(dup, 0.0)  # back to blocking reads (always preceded by poll/wait)
        return conn

    # -- run -------------------------------------------------------------------------------

    def run(
        self,
        job: str | Callable[..., Any],
        payload: Any = None,
        timeout_s: float = 60.0,
    ) -> list[Any]:
        """Run ``job(ctx, payload)`` on every rank; return the results in rank order.

        Raises :class:`RankJobError` (pool kept when every rank replied), or tears the pool down
        and raises :class:`RankTimeoutError` / :class:`RankDiedError`. A KeyboardInterrupt also
        tears it down (ranks may be inside collectives) before propagating.
        """
        name = job_name(job)
        if not self.running:
            why = f" ({self.last_teardown_reason})" if self.last_teardown_reason else ""
            raise PoolNotRunningError(f"pool '{self.layout}' is not running{why}; call start()")
        job_id = next(self._job_ids)
        # The payload is pickled on its own so a worker that cannot unpickle it (a class it cannot
        # import) still knows the job id and reports a job error instead of dying.
        blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        data = pickle.dumps(("job", job_id, name, blob), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            return self._run(name, job_id, data, timeout_s)
        except RankPoolError:
            raise
        except BaseException:
            self._teardown(graceful=False, reason=f"interrupted during job '{name}'")
            raise

    def _run(self, name: str, job_id: int, data: bytes, timeout_s: float) -> list[Any]:
        if self._proc is not None and self._proc.poll() is not None:
            self._raise_died(name, first_rank=None)  # torchrun gone since the last job
        for r in self._ranks:
            try:
                assert r.job_conn is not None
                r.job_conn.send_bytes(data)
            except OSError:
                self._raise_died(name, first_rank=r.info.rank)
        start = time.monotonic()
        deadline = start + timeout_s
        pending = {r.job_conn: r.info.rank for r in self._ranks}
        results: dict[int, Any] = {}
        failures: dict[int, tuple[str, str]] = {}
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            ready = wait(list(pending), timeout=min(deadline - now, _POLL_S))
            for conn in ready:
                rank = pending[conn]  # type: ignore[index]
                try:
                    raw = conn.recv_bytes()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self._raise_died(name, first_rank=rank)
                try:
                    rid, kind, value = pickle.loads(raw)
                except Exception as exc:  # e.g. the result's class is not importable here
                    del pending[conn]  # type: ignore[arg-type]
                    line = f"result could not be unpickled by the controller: {type(exc).__name__}: {exc}"
                    failures[rank] = (line, traceback.format_exc())
                    continue
                if rid != job_id:
                    continue  # cannot happen without a torn-down pool; ignore defensively
                del pending[conn]  # type: ignore[arg-type]
                if kind == "ok":
                    results[rank] = value
                else:
                    tb, line = value
                    failures[rank] = (line, tb)
            if not ready and self._proc is not None and self._proc.poll() is not None:
                self._raise_died(name, first_rank=None)
            if failures and pending:
                deadline = min(deadline, time.monotonic() + self.error_grace_s)
        if failures:
            self._raise_job_error(name, failures, sorted(pending.values()))
        if pending:
            self._raise_timeout(name, sorted(pending.values()), timeout_s)
        return [results[r] for r in range(self.world_size)]

    def _raise_job_error(
        self, name: str, failures: dict[int, tuple[str, str]], unfinished: list[int]
    ) -> NoReturn:
        if len(failures) == 1:
            ((rank, (line, _)),) = failures.items()
            msg = f"job '{name}' failed on rank {rank}: {line}"
        else:
            lines = [f"job '{name}' failed on ranks {sorted(failures)}:"]
            lines += [f"  rank {r}: {failures[r][0]}" for r in sorted(failures)]
            msg = "\n".join(lines)
        if unfinished:
            diag = self.diagnose()
            msg += (
                f"\nranks {unfinished} did not finish within {self.error_grace_s:g} s of the error "
                "(pool torn down):"
            )
            msg += "".join(f"\n  rank {r}: {_summary(diag.get(r))}" for r in unfinished)
            self._teardown(graceful=False, reason=f"rank error in job '{name}' left ranks busy")
        exc = RankJobError(msg, name, failures)
        for r in sorted(failures):
            _add_note(exc, f"--- rank {r} traceback ---\n{failures[r][1].rstrip()}")
        raise exc

    def _raise_timeout(self, name: str, stuck: list[int], timeout_s: float) -> NoReturn:
        diag = self.diagnose()
        lines = [
            f"rank {r} did not finish job '{name}' in {timeout_s:g} s: {_summary(diag.get(r))}"
            for r in stuck
        ]
        done = sorted(set(range(self.world_size)) - set(stuck))
        lines.append(f"(ranks {done} finished; pool torn down, call start() to run again)")
        self._teardown(graceful=False, reason=f"timeout in job '{name}'")
        exc = RankTimeoutError("\n".join(lines), name, stuck, diag)
        for r in stuck:
            d = diag.get(r)
            if isinstance(d, Diagnosis):
                _add_note(exc, f"--- rank {r} (pid {d.pid}) threads ---\n{d.stacks}")
        raise exc

    def _raise_died(self, name: str, first_rank: int | None) -> NoReturn:
        """Collect exit codes from torchrun's failure summary, tear down, raise RankDiedError."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10.0)  # torchrun reaps the rest and prints who failed
        tail = self.log_tail(200)
        codes = {int(m.group(1)): int(m.group(2)) for m in _FAILURE_RE.finditer(tail)}
        cause = tail.rfind("Root Cause")
        root = _FAILURE_RE.search(tail, cause) if cause >= 0 else None
        rc = proc.poll() if proc is not None else None
        rank: int | None = first_rank
        if root is not None:
            rank = int(root.group(1))  # torchrun's first observed failure beats our EOF order
        elif codes:
            rank = min(codes)
        elif rc is not None and rc != 0:
            rank = None  # torchrun itself died (its workers then exit as orphans)
        code = codes.get(rank) if rank is not None else None
        if rank is None:
            msg = f"torchrun (pid {self.torchrun_pid}) exited ({_describe_exit(rc)}) during job '{name}'"
        else:
            pid = self._ranks[rank].info.pid if rank < len(self._ranks) else "?"
            msg = f"rank {rank} (pid {pid}) died ({_describe_exit(code)}) during job '{name}'"
        msg += "; pool torn down, call start() to run again"
        self._teardown(graceful=False, reason=msg)
        exc = RankDiedError(msg, rank, code)
        if tail:
            _add_note(exc, "torchrun log (last lines):\n" + "\n".join(tail.splitlines()[-15:]))
        raise exc

    # -- diagnosis -------------------------------------------------------------------------

    def diagnose(self, timeout_s: float = _DIAGNOSE_TIMEOUT_S) -> dict[int, Diagnosis | str]:
        """Ask every rank's control thread what it is doing (works mid-collective).

        Ranks that do not answer in ``timeout_s`` map to a short explanation string.
        """
        out: dict[int, Diagnosis | str] = {}
        pending: dict[Any, int] = {}
        for r in self._ranks:
            conn = r.ctl_conn
            if conn is None:
                continue
            try:
                while conn.poll(0):  # drop a late answer to an earlier request
                    conn.recv()
                conn.send(("diagnose",))
                pending[conn] = r.info.rank
            except (EOFError, OSError):
                out[r.info.rank] = "control connection closed (process gone?)"
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for conn in wait(list(pending), timeout=max(0.0, deadline - time.monotonic())):
                rank = pending.pop(conn)
                try:
                    kind, value = conn.recv()  # type: ignore[union-attr]
                    out[rank] = value if kind == "diagnosis" else f"unexpected reply {kind!r}"
                except (EOFError, OSError):
                    out[rank] = "control connection closed (process gone?)"
                except Exception as exc:  # a diagnosis must never mask the failure it explains
                    out[rank] = f"unreadable diagnosis: {type(exc).__name__}: {exc}"
        for rank in pending.values():
            out[rank] = f"no answer to diagnosis in {timeout_s:g} s (GIL held or process frozen)"
        return out

    # -- teardown --------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask workers to exit, wait for torchrun, then kill whatever is left. Idempotent."""
        self._teardown(graceful=True, reason="closed", grace_s=timeout_s)

    def _teardown(self, *, graceful: bool, reason: str, grace_s: float = 10.0) -> None:
        proc = self._proc
        if (proc is None and not self._ranks and self._listener is None and not self._log_dir
                and not self._tmp_dir):
            return
        if reason != "restart":
            self.last_teardown_reason = reason
        worker_pids = [r.info.pid for r in self._ranks]
        if graceful and proc is not None and proc.poll() is None:
            for r in self._ranks:
                with contextlib.suppress(OSError, ValueError):
                    assert r.job_conn is not None
                    r.job_conn.send(("exit",))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        for r in self._ranks:
            for conn in (r.job_conn, r.ctl_conn):
                if conn is not None:
                    conn.close()
        self._ranks = []
        if proc is not None:
            self._kill_tree(proc, worker_pids)
            self._proc = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._log_dir is not None:
            if self._log_dir != self.keep_log_dir:
                shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
        if self._tmp_dir is not None:  # after the kill: nothing writes there any more
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
        if self._atexit_registered:
            atexit.unregister(self.close)
            self._atexit_registered = False

    def _kill_tree(self, proc: subprocess.Popen[bytes], worker_pids: list[int]) -> None:
        """SIGKILL workers (own sessions, so killpg alone misses them) and torchrun's group."""
        victims = set(_descendants(proc.pid))
        victims.update(p for p in worker_pids if _cmdline_has(p, f"--pool-id={self.pool_id}"))
        if proc.poll() is None or victims:
            for pid in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        deadline = time.monotonic() + 5.0
        while any(_alive(p) for p in victims) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> RankPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is the contract
        with contextlib.suppress(Exception):
            if self._proc is not None:
                self._teardown(graceful=False, reason="garbage collected")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RankPool('{self.layout}', device={self.device!r}, {state})"


def _summary(d: Diagnosis | str | None) -> str:
    if d is None:
        return "no diagnosis"
    return d if isinstance(d, str) else d.summary()
