"""A pool of long-lived rank workers under torchrun that runs any job function on every rank.

Why a pool: starting torchrun and importing torch on every rank costs seconds, a job round trip
costs about a millisecond, and a property-based search runs hundreds of examples.

Lifecycle: :meth:`RankPool.start` launches ``python -m scenarios.runner.launch ... -m
scenarios.runner.worker`` (torchrun's own parser and ``run``, see :mod:`.launch`) in its own
session; each worker connects back twice (job + control connection) to a
``multiprocessing.connection.Listener`` with a random authkey, accepted by a daemon thread so a
silent stray client cannot wedge the start. :meth:`RankPool.run` sends one job to every rank and
returns the results in rank order. A job error on some rank raises :class:`RankJobError` and
keeps the pool. A timeout (:class:`RankTimeoutError`, with every stuck rank's own status line and
stacks), a dead rank (:class:`RankDiedError`, its rank and exit code taken from torch elastic's
failure record that the launcher writes, never from log text) or a KeyboardInterrupt tear the
pool down: every worker and torchrun are killed and waited for (process trees via psutil). The
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
import dataclasses
import itertools
import os
import pickle
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any, Literal, NoReturn

import psutil

from scenarios.core.config import REPO_ROOT
from scenarios.core.errors import (
    MultiHostError,
    PlacementError,
    PoolNotRunningError,
    RankDiedError,
    RankJobError,
    RankPoolConfigError,
    RankPoolError,
    RankPoolStartError,
    RankTimeoutError,
)
from scenarios.core.layout import Layout
from scenarios.runner.launch import (
    ENV_FAILURES,
    ENV_STORE_BIND,
    FailureReport,
    RankFailure,
    read_failures,
)
from scenarios.runner.multihost import (
    LocalAgent,
    PoolConfig,
    describe_node,
    find_local_agent,
    parse_endpoint,
    publish_config,
    torchrun_command,
)
from scenarios.runner.netproxy import TcpProxy
from scenarios.runner.placement import DEFAULT_PLACEMENT, make_placement
from scenarios.runner.worker import ENV_ADDRESS, ENV_AUTHKEY, Diagnosis
from scenarios.runner.zygote import ENV_ZYGOTE

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

_REPO_ROOT = REPO_ROOT
_WORKER_MODULE = "scenarios.runner.worker"
_LAUNCH_MODULE = "scenarios.runner.launch"  # torchrun + a JSON record of failed ranks
_ZYGOTE_MODULE = "scenarios.runner.zygote"  # with preload: forks the ranks (zygote.py)
_STUB_MODULE = "scenarios.runner.rank_stub"  # with preload: what torchrun launches per rank
_POLL_S = 0.5  # slice for waits, so a dead torchrun is noticed while results are awaited
_ERROR_GRACE_S = 5.0  # after a rank errors, how long the other ranks get to finish
_DIAGNOSE_TIMEOUT_S = 3.0
_HANDSHAKE_TIMEOUT_S = 10.0  # a connection still silent after this is a stray: shut it down
_LOG_TAIL_LINES = 25


# -- errors --------------------------------------------------------------------------------------


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


def _live(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie."""
    try:
        return _live(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); return those still live."""
    live = list(procs)
    deadline = time.monotonic() + timeout_s
    while live:
        live = [p for p in live if _live(p)]
        if not live or time.monotonic() >= deadline:
            break
        psutil.wait_procs(live, timeout=0.05)  # returns early for our own children
    return live


def _carries_token(proc: psutil.Process, token: str) -> bool:
    try:
        return token in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def pool_processes(pool_id: str) -> list[int]:
    """Live (non-zombie) processes whose command line carries this pool id: torchrun + workers."""
    token = f"--pool-id={pool_id}"
    me = os.getpid()
    live = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == me or proc.info["status"] in (None, psutil.STATUS_ZOMBIE):
            continue
        if token in (proc.info["cmdline"] or ()):
            live.append(proc.pid)
    return sorted(live)


def _shutdown_sockets(port: int, peer: tuple[str, int] | None) -> int:
    """shutdown(2) this process's TCP socket on ``127.0.0.1:port``: the listening one when
    ``peer`` is None, else the connection accepted from ``peer``.

    Why: a thread blocked in accept(2) or in a handshake's read on a socket is woken by
    shutdown(2) but not by close(2). psutil finds the socket's fd; the fd is checked again after
    dup so a number reused in between is left alone. Returns how many sockets were shut down.
    """
    done = 0
    for c in psutil.Process().net_connections(kind="tcp4"):
        if c.fd < 0 or not c.laddr or c.laddr.port != port:
            continue
        if peer is None and c.status != psutil.CONN_LISTEN:
            continue
        if peer is not None and (not c.raddr or tuple(c.raddr) != tuple(peer)):
            continue
        try:
            sock = socket.socket(fileno=os.dup(c.fd))
        except OSError:
            continue
        with sock:
            try:
                if sock.getsockname()[1] != port:
                    continue
                if peer is not None and sock.getpeername() != tuple(peer):
                    continue
                sock.shutdown(socket.SHUT_RDWR)
                done += 1
            except OSError:
                continue
    return done


class _Acceptor:
    """``Listener.accept`` and each worker's hello in a daemon thread, feeding a queue.

    Why a thread: ``Listener.accept`` blocks in accept(2) and then in the authkey handshake,
    which never returns when a stray client connects and stays silent. The pool's main thread
    reads the queue in ``_POLL_S`` slices (so it notices torchrun's exit and its own deadline)
    and calls :meth:`reap_stuck`, which shuts down a connection that has sat in the handshake
    for ``_HANDSHAKE_TIMEOUT_S``; :meth:`close` wakes and joins the thread.
    """

    def __init__(self, authkey: bytes, n_expected: int, host: str = "127.0.0.1") -> None:
        self.listener = Listener((host, 0), authkey=authkey, backlog=max(64, n_expected))
        self.address: tuple[str, int] = self.listener.address  # type: ignore[assignment]
        self.hellos: queue.SimpleQueue[tuple[Connection, tuple[Any, ...]]] = queue.SimpleQueue()
        self._closing = False
        self._done_peer: Any = None  # peer of the last accept() that returned or raised
        self._stuck: tuple[Any, float] | None = None  # (peer, since) seen mid-handshake
        self.thread = threading.Thread(
            target=self._serve, name=f"cpcheck-pool-accept-{self.address[1]}", daemon=True
        )
        self.thread.start()

    def _peer(self) -> Any:
        try:
            return self.listener.last_accepted
        except AttributeError:  # listener closed
            return None

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn = self.listener.accept()
            except Exception:  # a stray or wrong authkey, a reaped handshake, or close()
                self._done_peer = self._peer()
                if not self._closing:
                    time.sleep(0.01)  # never spin if accept(2) itself keeps failing (EMFILE)
                continue
            self._done_peer = self._peer()
            hello = self._read_hello(conn)
            if hello is None or self._closing:
                conn.close()
                continue
            self.hellos.put((conn, hello))

    def _read_hello(self, conn: Connection) -> tuple[Any, ...] | None:
        """The worker's ``("hello", kind, rank, pid, device)``, sent right after the handshake."""
        deadline = time.monotonic() + _HANDSHAKE_TIMEOUT_S
        try:
            while not conn.poll(_POLL_S):
                if self._closing or time.monotonic() > deadline:
                    return None
            hello = conn.recv()
        except Exception:  # died mid-hello; torchrun's exit is noticed by the main thread
            return None
        ok = isinstance(hello, tuple) and len(hello) == 5 and hello[0] == "hello"
        return hello if ok and hello[1] in ("job", "ctl") and isinstance(hello[2], int) else None

    def get(self, timeout_s: float) -> tuple[Connection, tuple[Any, ...]] | None:
        try:
            return self.hellos.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def reap_stuck(self) -> None:
        """Shut down the connection the thread has been handshaking with for too long."""
        peer = self._peer()
        if peer is None or peer == self._done_peer:
            self._stuck = None
            return
        now = time.monotonic()
        if self._stuck is None or self._stuck[0] != peer:
            self._stuck = (peer, now)
        elif now - self._stuck[1] >= _HANDSHAKE_TIMEOUT_S:
            _shutdown_sockets(self.address[1], peer)
            self._stuck = None

    def close(self) -> None:
        """Stop the thread (wake it from accept(2) or a handshake), close the port, drain."""
        self._closing = True
        port = self.address[1]
        with contextlib.suppress(OSError, psutil.Error):
            _shutdown_sockets(port, None)
            peer = self._peer()
            if peer is not None and peer != self._done_peer:
                _shutdown_sockets(port, peer)
        self.thread.join(timeout=5.0)
        self.listener.close()
        while True:
            try:
                conn, _ = self.hellos.get_nowait()
            except queue.Empty:
                break
            conn.close()


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
        nnodes: int = 1,
        rdzv_endpoint: str | None = None,
        placement: str = DEFAULT_PLACEMENT,
        proxy_hosts: bool = False,
        preload: str | None = None,
    ) -> None:
        self.layout = Layout.parse(layout, max_world=None)
        self.nnodes = int(nnodes)
        self.rdzv_endpoint = rdzv_endpoint
        if self.nnodes == 1 and placement != DEFAULT_PLACEMENT:
            raise PlacementError(f"--placement {placement}: placing ranks on hosts needs "
                                 "--nnodes N > 1")
        if self.nnodes > 1:  # ranks on several hosts: see scenarios/runner/multihost.py
            try:
                parse_endpoint(rdzv_endpoint or "")
            except ValueError as e:
                raise RankPoolConfigError(str(e)) from None
            if self.layout.world_size % self.nnodes:
                raise RankPoolConfigError(
                    f"layout '{self.layout}' has {self.layout.world_size} ranks, which "
                    f"{self.nnodes} hosts cannot share evenly")
        elif self.nnodes < 1:
            raise RankPoolConfigError(f"nnodes {nnodes}: expected >= 1")
        #: which host each layout rank lives on (scenarios/runner/placement.py)
        self.placement = make_placement(placement, self.layout, self.nnodes)
        #: each other host's workers reach the controller through a TCP proxy of its own
        #: (scenarios/runner/netproxy.py: the network faults act there)
        self.proxy_hosts = bool(proxy_hosts) and self.nnodes > 1
        self.links: dict[int, TcpProxy] = {}
        cap = max_ranks if max_ranks is not None else max_ranks_here()
        if self.layout.world_size // self.nnodes > cap:
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
        #: "module:function" a zygote calls once before forking every rank (zygote.py): heavy
        #: imports paid once per pool; None: torchrun's workers import for themselves. A pool
        #: over several hosts ignores it (each host's agent launches plain workers).
        if preload is not None and ":" not in preload:
            raise RankPoolConfigError(f"preload {preload!r}: expected 'package.module:function'")
        self.preload = preload if self.nnodes == 1 else None

        self.pool_id = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._zygote: subprocess.Popen[bytes] | None = None
        self._acceptor: _Acceptor | None = None
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
    def zygote_pid(self) -> int | None:
        """The process the ranks were forked from (``preload``), else None."""
        return self._zygote.pid if self._zygote is not None else None

    def _zygote_exit(self) -> int | None:
        """The zygote's exit status once it has died (None while it runs or without one)."""
        return self._zygote.poll() if self._zygote is not None else None

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
        bind = parse_endpoint(self.rdzv_endpoint)[0] if self.nnodes > 1 else "127.0.0.1"
        self._acceptor = _Acceptor(authkey, 2 * self.world_size, bind)
        host, port = self._acceptor.address
        address = f"{host}:{port}"
        if self.proxy_hosts:
            self.links = {k: TcpProxy((host, port), bind, name=f"node {k}")
                          for k in range(1, self.nnodes)}
            address = ",".join([address] + [f"{p.address[0]}:{p.address[1]}"
                                            for _, p in sorted(self.links.items())])
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
        loopback = self.nnodes == 1 or parse_endpoint(str(self.rdzv_endpoint))[0] in (
            "127.0.0.1", "localhost")
        if loopback and "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
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
        env[ENV_ADDRESS] = address
        env[ENV_AUTHKEY] = authkey.hex()
        env[ENV_FAILURES] = self._failures_path()
        env[ENV_STORE_BIND] = bind  # the agent's stores listen where the acceptor does
        worker_module = _WORKER_MODULE
        if self.preload is not None:
            worker_module = _STUB_MODULE
            env[ENV_ZYGOTE] = os.path.join(self._tmp_dir, "zygote.sock")
            self._zygote = subprocess.Popen(
                [self.python, "-m", _ZYGOTE_MODULE, f"--pool-id={self.pool_id}",
                 f"--socket={env[ENV_ZYGOTE]}", f"--preload={self.preload}"],
                stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # own group: killpg reaches it and its ranks
            )

        cmd = [
            self.python,
            "-m",
            _LAUNCH_MODULE,
            "--nnodes=1",
            f"--nproc-per-node={self.world_size}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{self.port or 0}",
            "--rdzv-conf=is_host=1",
            "--local-addr=127.0.0.1",
            "--max-restarts=0",
            "--monitor-interval=0.1",
            "-m",
            worker_module,
            f"--pool-id={self.pool_id}",
            f"--layout={self.layout}",
            f"--device={self.device}",
            f"--collective-timeout-s={self.collective_timeout_s}",
        ]
        cfg = None
        if self.nnodes > 1:  # the same torchrun on every host; this one hosts the store
            cfg = PoolConfig(self.pool_id, str(self.layout), self.device,
                             self.collective_timeout_s, self.nnodes,
                             self.world_size // self.nnodes, address, authkey.hex(),
                             self.placement.name)
            cmd = torchrun_command(self.python, cfg, str(self.rdzv_endpoint), is_host=True)
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
        if cfg is not None:  # the other hosts' agents read it from the rendezvous store
            proc = self._proc
            try:
                publish_config(str(self.rdzv_endpoint), cfg,
                               time.monotonic() + self.start_timeout_s,
                               lambda: proc.poll() is None)
            except MultiHostError as e:
                raise RankPoolStartError(str(e)) from None

    def _accept_all(self) -> None:
        assert self._acceptor is not None and self._proc is not None
        n = self.world_size
        deadline = time.monotonic() + self.start_timeout_s
        job: dict[int, tuple[Connection, RankInfo]] = {}
        ctl: dict[int, Connection] = {}
        try:
            while len(job) < n or len(ctl) < n:
                zcode = self._zygote_exit()  # first: its death ends the stubs, then torchrun
                if zcode is not None:
                    raise RankPoolStartError(
                        f"pool '{self.layout}' failed to start: its zygote (pid "
                        f"{self.zygote_pid}, preload {self.preload}) exited "
                        f"({_describe_exit(zcode)}) after {len(job)} of {n} ranks connected")
                code = self._proc.poll()
                if code is not None:
                    self._raise_start_failed(code, len(job))
                if time.monotonic() > deadline:
                    missing = sorted(set(range(n)) - set(job))
                    raise RankPoolStartError(
                        f"pool '{self.layout}' did not start in {self.start_timeout_s:g} s: "
                        f"{len(job)} of {n} ranks connected (missing {missing})"
                        f"{self._who_is_missing(missing)}"
                    )
                got = self._acceptor.get(_POLL_S)
                self._acceptor.reap_stuck()
                if got is None:
                    continue
                conn, (_, kind, rank, pid, device) = got
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
        self._acceptor.close()  # every rank is in; free the port and the thread now
        self._acceptor = None

    def _who_is_missing(self, missing: list[int]) -> str:
        """For a pool over hosts: which hosts those ranks live on, or that none joined."""
        if self.nnodes == 1:
            return ""
        if len(missing) == self.world_size:  # torchrun starts workers only after rendezvous
            return (f"; the rendezvous at {self.rdzv_endpoint} never completed: at least one "
                    f"of the {self.nnodes - 1} agent(s) (`cpcheck agent --nnodes {self.nnodes} "
                    f"--rdzv-endpoint {self.rdzv_endpoint}`) never joined")
        nodes = sorted({self.placement.node_of(r) for r in missing})
        return "; missing: " + ", ".join(self.describe_node(k) for k in nodes)

    def local_agents(self) -> dict[int, LocalAgent]:
        """The other hosts' agents that run on this machine (one machine as several hosts),
        by node: what `stop_agent` / `kill_agent` signal and a soak restarts."""
        if self.nnodes == 1 or not self.running:
            return {}
        pids = {r.info.rank: r.info.pid for r in self._ranks}
        out = {}
        for node in range(1, self.nnodes):
            agent = find_local_agent(node, [pids[r] for r in self.placement.ranks_on(node)],
                                     self.pool_id)
            if agent is not None:
                out[node] = agent
        return out

    def describe_node(self, node: int) -> str:
        """'agent 2 of 2 (ranks 1, 3)': a host and the layout ranks it holds."""
        return describe_node(node, self.nnodes, self.world_size // self.nnodes,
                             self.placement.ranks_on(node))

    def _raise_start_failed(self, code: int, connected: int) -> NoReturn:
        msg = (
            f"pool '{self.layout}' failed to start: torchrun exited with code {code} "
            f"after {connected} of {self.world_size} ranks connected"
        )
        report = self._failures()
        if report is not None:
            f = report.first
            msg += f"; rank {f.rank} (pid {f.pid}) failed first ({f.describe()})"
            if f.traceback:
                msg += f": {f.message}"
            if "CUDA error: out of memory" in (f.message or ""):
                msg += ("; CUDA ran out of memory creating a context: too many ranks on this GPU "
                        "(fewer pytest-xdist workers, or CPCHECK_MAX_POOL_RANKS per executor)")
        exc = RankPoolStartError(msg)
        if report is not None:
            _note_failures(exc, report)
        raise exc

    def _failures_path(self) -> str:
        assert self._tmp_dir is not None
        return os.path.join(self._tmp_dir, "rank-failures.json")

    def _failures(self) -> FailureReport | None:
        """The launcher's record of failed ranks, once torchrun has exited after a failure."""
        report = read_failures(self._failures_path()) if self._tmp_dir is not None else None
        if report is None or self.placement.name == DEFAULT_PLACEMENT:
            return report
        # torch elastic names torchrun's ranks; diagnoses speak layout ranks
        to = self.placement.layout_rank
        return FailureReport(to(report.root_cause), {
            to(r): dataclasses.replace(f, rank=to(r)) for r, f in report.failures.items()})

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
            if not ready and ((self._proc is not None and self._proc.poll() is not None)
                              or self._zygote_exit() is not None):
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
            f"rank {r}{'' if self.nnodes == 1 else ' on ' + self.describe_node(self.placement.node_of(r))}"
            f" did not finish job '{name}' in {timeout_s:g} s: {_summary(diag.get(r))}"
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
        """Tear down and raise RankDiedError with the root cause from torch elastic's record.

        torchrun (our launcher) notices the dead worker, stops the others and writes every failed
        rank's exit code and pid before it exits; the first failure by torch's timestamp is the
        root cause, whatever order we saw the connections close in. Without that record torchrun
        itself died (its workers then exit as orphans): ``rank=None``.
        """
        proc = self._proc
        gone = self._hosts_gone() if self.nnodes > 1 else []
        if gone:
            # every rank of another host closed its connection: that host's agent left (this
            # host's ranks then fail in collectives with the ones that are gone; not the cause)
            where = ", ".join(self.describe_node(k) for k in gone)
            msg = (f"{where} left during job '{name}': every rank there closed its connection; "
                   f"pool torn down, call start() to run again")
            self._teardown(graceful=False, reason=msg)
            raise RankDiedError(msg, self.placement.ranks_on(gone[0])[0], None, node=gone[0])
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10.0)  # torchrun reaps the rest and writes who failed
        report = self._failures()
        rc = proc.poll() if proc is not None else None
        zcode = self._zygote_exit()
        rank: int | None
        if zcode is not None:  # every rank was forked from it: the root cause, whatever else
            rank, code = None, None
            msg = (f"the pool's zygote (pid {self.zygote_pid}, the process every rank was "
                   f"forked from) died ({_describe_exit(zcode)}) during job '{name}'")
        elif report is not None:
            f = report.first
            rank, code = f.rank, f.exitcode
            msg = f"rank {rank} (pid {f.pid}) died ({f.describe()}) during job '{name}'"
        elif (rc is not None and rc != 0) or first_rank is None:
            rank, code = None, None
            msg = f"torchrun (pid {self.torchrun_pid}) exited ({_describe_exit(rc)}) during job '{name}'"
        else:  # torchrun still running (or exited 0): all we know is which connection closed
            rank, code = first_rank, None
            pid = self._ranks[rank].info.pid if rank < len(self._ranks) else "?"
            msg = f"rank {rank} (pid {pid}) died ({_describe_exit(code)}) during job '{name}'"
        msg += "; pool torn down, call start() to run again"
        tail = self.log_tail(15)
        self._teardown(graceful=False, reason=msg)
        exc = RankDiedError(msg, rank, code)
        if report is not None:
            _note_failures(exc, report)
        if tail:
            _add_note(exc, "torchrun log (last lines):\n" + tail)
        raise exc

    def _hosts_gone(self, window_s: float = 2.0) -> list[int]:
        """Nodes other than this one whose ranks all closed their job connections (waits up to
        `window_s` for them: a host's ranks go together, seen one by one)."""
        closed: set[int] = set()
        deadline = time.monotonic() + window_s
        while True:
            for r in self._ranks:
                if r.info.rank in closed or r.job_conn is None:
                    continue
                try:
                    if r.job_conn.poll(0):
                        r.job_conn.recv_bytes()  # a late result: discarded, the pool goes down
                except (EOFError, OSError):
                    closed.add(r.info.rank)
            gone = [k for k in range(1, self.nnodes)
                    if all(r in closed for r in self.placement.ranks_on(k))]
            if gone or time.monotonic() >= deadline:
                return gone
            time.sleep(0.05)

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
        if (proc is None and not self._ranks and self._acceptor is None and not self._log_dir
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
        if self._zygote is not None:  # after torchrun: its stubs no longer ask for ranks
            _kill_group(self._zygote)
            self._zygote = None
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        for link in self.links.values():
            link.close()
        self.links = {}
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
        victims: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            victims.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
        token = f"--pool-id={self.pool_id}"
        for pid in worker_pids:  # orphaned when torchrun died first: no longer its children
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if pid not in victims and _carries_token(p, token):
                    victims[pid] = p
        if proc.poll() is None or victims:
            for p in victims.values():
                with contextlib.suppress(psutil.Error):
                    p.kill()  # psutil refuses if the pid was reused meanwhile
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        _wait_gone(victims.values(), 5.0)

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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started in its own session and everything in its group, and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10.0)


def _note_failures(exc: BaseException, report: FailureReport) -> None:
    """torch elastic's record of every failed rank, root cause first, with its traceback."""
    order = [report.root_cause] + sorted(r for r in report.failures if r != report.root_cause)
    lines = ["failed ranks (torch elastic, root cause first):"]
    for r in order:
        f: RankFailure = report.failures[r]
        said = f": {f.message}" if f.traceback or f.exitcode < 0 else ""  # else torch's filler
        lines.append(f"  rank {r} (pid {f.pid}): {f.describe()}{said}")
    _add_note(exc, "\n".join(lines))
    if report.first.traceback:
        _add_note(exc, f"--- rank {report.root_cause} traceback ---\n{report.first.traceback.rstrip()}")


def _summary(d: Diagnosis | str | None) -> str:
    if d is None:
        return "no diagnosis"
    return d if isinstance(d, str) else d.summary()
