"""A preloaded process that forks the pool's ranks: heavy imports paid once per pool, not per rank.

Why: a rank worker that imports torch and a SGLang release spends ~5 s and ~500 MB doing it, and
a 2x2 pool on a 2-core box pays that four times over before its first job. With ``preload`` a
:class:`~.torchrun_pool.RankPool` starts this zygote next to torchrun. It binds a Unix socket at
once, then imports torch, the worker module and the preload function's module and calls it
(``"module:function"``, no arguments; if it raises, the zygote says so in the pool's log and
forks all the same: the ranks then import for themselves and fail, if they do, in their own
job, as without a zygote). torchrun still launches one process per rank, but that
process is :mod:`.rank_stub` (no torch): it hands the zygote its argv, environment (RANK,
WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_ERROR_FILE, ...), working directory and stdio, and the
zygote forks a child that runs :func:`scenarios.runner.worker.main` with them. The zygote reaps
each child and sends its wait status to its stub, which exits the same way (same code, same
signal), so torchrun's failure record and the pool's diagnosis read as they do without it.

Fork safety: the zygote forks from its main thread with no other thread, process group or
OpenMP pool in existence (it refuses to fork, exit 3, if it finds another thread). Lifetime: it
exits when its parent (the pool's controller) goes away, on SIGTERM / SIGINT, and SIGKILLs its
children first; a child is SIGKILLed when its stub's connection closes (torchrun killed the
stub), and dies with the zygote (PR_SET_PDEATHSIG, and the worker's own orphan check).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from typing import Any

__all__ = ["ENV_ZYGOTE", "EXIT_ZYGOTE_LOST", "main", "read_message", "write_message"]

#: the zygote's Unix socket path, set in torchrun's environment for the rank stubs
ENV_ZYGOTE = "CPCHECK_POOL_ZYGOTE"
#: a rank stub's exit code when its zygote went away before its child's status came
EXIT_ZYGOTE_LOST = 5
EXIT_UNSAFE = 3  # another thread runs here: forking now could deadlock a child

_POLL_S = 0.1
_READ_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


# -- framing: a 4-byte length, then JSON (shared with rank_stub) ---------------------------------


def write_message(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_message(sock: socket.socket) -> Any:
    """One message, or None when the peer closed the connection."""
    head = _read_exact(sock, 4)
    if head is None:
        return None
    body = _read_exact(sock, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


# -- the child -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """SIGKILL this process when the thread that forked it (the zygote's only one) exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the worker's check remains
        pass


def _run_child(zygote_pid: int, request: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become the rank the stub describes, then run the worker."""
    _die_with_parent()
    if os.getppid() != zygote_pid:  # the zygote died between fork and prctl
        return EXIT_ZYGOTE_LOST
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a plain worker's dispositions, as before
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if "numpy" in sys.modules:  # inherited from the zygote: give each rank its own stream
        sys.modules["numpy"].random.seed()
    from scenarios.runner import worker

    sys.argv = [worker.__file__, *request["argv"]]
    return worker.main(request["argv"])


def _fork_rank(listener: socket.socket, conns: dict[int, socket.socket],
               conn: socket.socket, request: dict[str, Any], fds: list[int]) -> int:
    zygote_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # child: never returns into the zygote's loop
        code = 1
        try:
            listener.close()
            for c in conns.values():
                c.close()
            conn.close()
            code = _run_child(zygote_pid, request, fds)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    for fd in fds:
        os.close(fd)
    return pid


# -- the zygote ----------------------------------------------------------------------------------


def _threads_here() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        import threading

        return threading.active_count()


def _preload(spec: str) -> None:
    import torch  # noqa: F401  (the point: imported once, here)
    import torch.distributed  # noqa: F401

    import scenarios.runner.worker  # noqa: F401

    if spec:
        module, _, attr = spec.partition(":")
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        fn()


def _read_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """A stub's request: its stdio as SCM_RIGHTS on one byte, then the JSON message."""
    conn.settimeout(_READ_TIMEOUT_S)
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        request = read_message(conn)
    except (OSError, ValueError):
        return None
    if not isinstance(request, dict) or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    return request, list(fds)


class _Children:
    """Forked ranks: pid -> the stub connection waiting for its status."""

    def __init__(self) -> None:
        self.by_pid: dict[int, socket.socket] = {}

    def reap(self) -> None:
        while self.by_pid:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.by_pid.pop(pid, None)
            if conn is not None:
                try:
                    write_message(conn, {"exit": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()

    def kill_all(self) -> None:
        for pid in list(self.by_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while self.by_pid and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(listener: socket.socket, parent_pid: int) -> int:
    """Fork a rank per stub request until the parent goes away or a signal arrives."""
    children = _Children()
    try:
        while True:
            if os.getppid() != parent_pid:
                return 0  # the pool's controller is gone: so are we (children first)
            watched = [listener, *children.by_pid.values()]
            readable, _, _ = select.select(watched, [], [], _POLL_S)
            for sock in readable:
                if sock is listener:
                    conn, _ = listener.accept()
                    got = _read_request(conn)
                    if got is None:
                        conn.close()
                        continue
                    if _threads_here() != 1:
                        print(f"cpcheck zygote: {_threads_here()} threads run here; refusing "
                              "to fork a rank (a child could deadlock)", file=sys.stderr)
                        return EXIT_UNSAFE
                    request, fds = got
                    pid = _fork_rank(listener, children.by_pid, conn, request, fds)
                    children.by_pid[pid] = conn
                    write_message(conn, {"pid": pid})
                else:  # a stub closed its connection (it was killed): its rank goes too
                    pid = next(p for p, c in children.by_pid.items() if c is sock)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            children.reap()
    except _Stop:
        return 0
    finally:
        children.kill_all()
        listener.close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scenarios.runner.zygote")
    p.add_argument("--pool-id", required=True, help="the pool's id (found by pool_processes)")
    p.add_argument("--socket", required=True, help="Unix socket path the rank stubs connect to")
    p.add_argument("--preload", default="", help="'module:function' called once before forking")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    parent_pid = os.getppid()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket)  # first: stubs may connect while the imports run
    listener.listen(256)
    try:
        _preload(args.preload)
    except _Stop:
        return 0
    except Exception:  # only a speed-up: the ranks import for themselves and fail, if they do,
        # in their own job with their own error, as without a zygote
        print(f"cpcheck zygote: preload {args.preload or '(torch)'} failed; the ranks will "
              "import for themselves:", file=sys.stderr)
        traceback.print_exc()
    return serve(listener, parent_pid)


if __name__ == "__main__":
    sys.exit(main())
