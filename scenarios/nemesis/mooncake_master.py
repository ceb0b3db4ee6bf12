"""The harness owns its Mooncake master: start it on free loopback ports, stop it for sure.

A master left running holds ports and memory and confuses the next run, so every master
started here is stopped by `stop()`, by the context manager, at interpreter exit (atexit),
on SIGTERM/SIGINT (chained handlers), and, when started from the main thread, by the kernel
if this process dies hard (`setpriv --pdeathsig`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from scenarios.core.errors import MooncakeMasterError

__all__ = [
    "MooncakeMaster",
    "MooncakeMasterError",
    "check_master_reachable",
    "find_master_binary",
    "master_pids",
    "mooncake_available",
    "parse_address",
]

LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------ discovery


def find_master_binary() -> str | None:
    """The real `mooncake_master` executable, preferring the one inside the package.

    The console script on PATH (often behind a pyenv shim) only execs that binary, so
    launching it directly saves a Python start-up per master and keeps `pid` the master's.
    """
    try:
        spec = importlib.util.find_spec("mooncake")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "mooncake_master"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("mooncake_master")


def mooncake_available(need_binary: bool = True) -> tuple[bool, str]:
    """(True, "") when `mooncake.store` imports (and a master binary exists), else the reason.

    `need_binary=False` is for runs against an existing master, where only clients run here.
    """
    from reference.api import StorageError
    from reference.api import import_mooncake_store as _import_store

    try:
        _import_store()
    except StorageError as e:
        return False, str(e)
    if need_binary and find_master_binary() is None:
        return False, "mooncake_master not found on PATH nor in the mooncake package"
    return True, ""


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "HOST:PORT"."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MooncakeMasterError(f"invalid Mooncake master address {address!r} (want HOST:PORT)")
    return host.strip("[]"), int(port)


def check_master_reachable(address: str, timeout: float = 2.0) -> None:
    """Raise a one-line MooncakeMasterError unless something accepts TCP at `address`."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise MooncakeMasterError(f"Mooncake master {host}:{port} unreachable ({reason})") from None


# ------------------------------------------------------------------ ports and processes


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _owns_listener(pid: int, port: int) -> bool | None:
    """Whether `pid` itself listens on TCP `port` (None: this system will not tell us)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False  # gone: the caller's poll() reports how it exited
    except (psutil.AccessDenied, NotImplementedError):
        return None
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def master_pids(rpc_port: int | None = None) -> list[int]:
    """PIDs of running mooncake_master processes (optionally only those on `rpc_port`),
    so tests can prove no master was left behind."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        argv = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if not any(a.endswith("mooncake_master") for a in argv[:5]):
            continue
        if rpc_port is not None and f"--rpc_port={rpc_port}" not in argv:
            continue
        out.append(proc.pid)
    return out


# ------------------------------------------------------------------ cleanup registry

_LIVE: set[MooncakeMaster] = set()
_LIVE_LOCK = threading.RLock()  # re-entrant: a signal handler may run while it is held
_HANDLERS_INSTALLED = False


def _stop_all() -> None:
    with _LIVE_LOCK:
        masters = list(_LIVE)
    for m in masters:
        with contextlib.suppress(Exception):
            m.stop()


atexit.register(_stop_all)


def _install_signal_handlers() -> None:
    """Stop every master on SIGTERM/SIGINT, then do what the previous handler would."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    _HANDLERS_INSTALLED = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            if callable(previous):
                # a Python handler (Ctrl-C's KeyboardInterrupt): the unwinding stops clients,
                # then masters; stopping masters first left clients retrying for seconds
                previous(signum, frame)
                return
            _stop_all()
            if previous == signal.SIG_IGN:
                return
            else:  # SIG_DFL (or unknown): die of the same signal, as without us
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, handler)


# ------------------------------------------------------------------ the master


class MooncakeMaster:
    """A `mooncake_master` on loopback owned by this process.

    Ports default to free ones (bind-to-port-0, retried if another process grabs one
    before the master binds it). Readiness means the master process itself listens on both
    ports: a probe alone would succeed against a different master on a taken port while
    ours is about to exit with "Address already in use".
    """

    def __init__(
        self,
        rpc_port: int | None = None,
        metrics_port: int | None = None,
        *,
        host: str = LOOPBACK,
        default_kv_lease_ttl_ms: int = 100,
        client_ttl_s: int = 2,
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 3.0,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        keep_log: bool = False,
    ) -> None:
        self.host = host
        self._fixed_ports = rpc_port is not None
        self.rpc_port = rpc_port if rpc_port is not None else 0
        self.metrics_port = metrics_port if metrics_port is not None else 0
        self.default_kv_lease_ttl_ms = default_kv_lease_ttl_ms
        self.client_ttl_s = client_ttl_s
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = list(extra_args)
        self.binary = binary
        self.keep_log = keep_log
        self.log_path: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._lock = threading.RLock()

    # -- public API

    @property
    def address(self) -> str:
        """ "HOST:PORT" of the RPC port, what clients pass as master_server_addr."""
        return f"{self.host}:{self.rpc_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MooncakeMaster:
        """Launch and wait until ready; MooncakeMasterError (with the log's tail) if not."""
        with self._lock:
            if self.running:
                return self
            binary = self.binary or find_master_binary()
            if binary is None:
                raise MooncakeMasterError(mooncake_available()[1] or "mooncake_master not found")
            if self.log_path is None:
                fd, self.log_path = tempfile.mkstemp(prefix="mooncake_master-", suffix=".log")
                os.close(fd)
            attempts = 1 if self._fixed_ports else 4
            for attempt in range(attempts):
                if not self._fixed_ports:
                    self.rpc_port = _free_port(self.host)
                    self.metrics_port = _free_port(self.host)
                    while self.metrics_port == self.rpc_port:
                        self.metrics_port = _free_port(self.host)
                elif not self.metrics_port:
                    self.metrics_port = _free_port(self.host)
                try:
                    self._launch(binary)
                    return self
                except MooncakeMasterError:
                    if attempt == attempts - 1:
                        self._discard_log()
                        raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM the master's process group, SIGKILL after `stop_timeout_s`. Idempotent."""
        with self._lock:
            self._stop_process()
            self._discard_log()

    def kill_now(self) -> None:
        """SIGKILL without waiting: on the way out after Ctrl-C nothing it holds is needed, and
        the kernel reaps it (a later `stop()` finds nothing to do)."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                self._signal_group(proc, signal.SIGKILL)
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def restart(self) -> None:
        """Stop, then start again on the same ports (all stored data is lost)."""
        with self._lock:
            if not self.rpc_port:  # never started: nothing to keep
                self.start()
                return
            self._stop_process()
            if self.log_path is None:
                fd, self.log_path = tempfile.mkstemp(prefix="mooncake_master-", suffix=".log")
                os.close(fd)
            binary = self.binary or find_master_binary()
            if binary is None:
                raise MooncakeMasterError(mooncake_available()[1] or "mooncake_master not found")
            self._launch(binary)

    def log_tail(self, lines: int = 10, width: int = 300) -> str:
        """The last lines of the master's log, each cut to `width` (metrics lines are huge)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        tail = [ln[:width] for ln in text.splitlines() if ln.strip()][-lines:]
        return "\n".join(tail)

    def __enter__(self) -> MooncakeMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MooncakeMaster({self.address}, pid={self.pid}, running={self.running})"

    # -- internals

    def _command(self, binary: str) -> list[str]:
        cmd = [
            binary,
            f"--rpc_address={self.host}",
            f"--rpc_port={self.rpc_port}",
            f"--metrics_host={self.host}",
            f"--metrics_port={self.metrics_port}",
            "--logtostderr",
            f"--default_kv_lease_ttl={self.default_kv_lease_ttl_ms}",
            f"--client_ttl={self.client_ttl_s}",
            *self.extra_args,
        ]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            # The kernel SIGTERMs the master if the thread that forked it dies (even by
            # SIGKILL), the one case atexit and signal handlers cannot cover. setpriv execs,
            # so the pid stays the master's. Only from the main thread: a worker thread
            # exiting would otherwise take the master with it.
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        return cmd

    def _launch(self, binary: str) -> None:
        assert self.log_path is not None
        _install_signal_handlers()
        cmd = self._command(binary)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _stop_process
        self._log_file.write(f"=== {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches any helpers
            close_fds=True,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self._stop_process()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        probe_ok_since: float | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise MooncakeMasterError(
                    f"mooncake_master on {self.address} (metrics port {self.metrics_port}) "
                    f"exited with code {code} during start-up; a port may be taken. "
                    f"Last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            owns = [_owns_listener(self._proc.pid, p) for p in (self.rpc_port, self.metrics_port)]
            if all(o is True for o in owns):
                return
            if None in owns:
                # psutil cannot see its sockets here: fall back to a probe plus a grace
                # period long enough for a master that lost the bind race to exit (about 1 s).
                try:
                    socket.create_connection((self.host, self.rpc_port), timeout=0.2).close()
                    probe_ok_since = probe_ok_since or time.monotonic()
                    if time.monotonic() - probe_ok_since > 1.5:
                        return
                except OSError:
                    probe_ok_since = None
            if time.monotonic() > deadline:
                raise MooncakeMasterError(
                    f"mooncake_master on {self.address} not ready after "
                    f"{self.start_timeout_s:.0f} s. Last log lines ({self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _discard_log(self) -> None:
        if self.log_path and not self.keep_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
            self.log_path = None
