"""What torchrun launches per rank in a pool with a zygote: asks the zygote for a forked rank.

No torch here (that is the point: the zygote imported it once). The stub sends its stdio, argv,
environment and working directory to the zygote (:mod:`.zygote`), learns the pid of the rank
forked for it, forwards SIGTERM / SIGINT / SIGHUP / SIGUSR1 / SIGUSR2 to it, and exits the way
the rank did: the same exit code, or killed by the same signal. torchrun therefore sees its
"worker" fail exactly when and how the rank does, and killing the stub (torchrun's teardown)
closes its connection, on which the zygote SIGKILLs the rank. If the zygote goes away first the
stub says so on stderr and in torch elastic's error file, and exits ``EXIT_ZYGOTE_LOST``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

from scenarios.runner.zygote import ENV_ZYGOTE, EXIT_ZYGOTE_LOST, read_message, write_message

_CONNECT_TIMEOUT_S = 30.0  # the zygote binds its socket before importing anything heavy
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _connect(path: str) -> socket.socket:
    deadline = time.monotonic() + _CONNECT_TIMEOUT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _lost(why: str) -> int:
    """The zygote is gone: say so where a person (stderr) and torchrun (error file) look."""
    msg = f"cpcheck rank stub (pid {os.getpid()}): the pool's zygote {why}"
    print(msg, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": f"ZygoteLost: {msg}", "extraInfo": {
                    "py_callstack": msg, "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass
    return EXIT_ZYGOTE_LOST


def _exit_like(code: int) -> None:
    """Leave with `code` as os.waitstatus_to_exitcode gave it (negative: that signal)."""
    if code < 0:
        sig = -code
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these two take no handler
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1.0)  # pragma: no cover - the signal ends us first
        os._exit(128 + sig)
    os._exit(code)


def main() -> int:
    path = os.environ.get(ENV_ZYGOTE)
    if not path:
        print(f"cpcheck rank stub: {ENV_ZYGOTE} is not set", file=sys.stderr)
        return 3
    child = [0]
    pending: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if child[0]:
            try:
                os.kill(child[0], signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    try:
        sock = _connect(path)
    except OSError as e:
        return _lost(f"socket {path} never answered: {e}")
    request = {"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}
    try:
        socket.send_fds(sock, [b"F"], [0, 1, 2])
        write_message(sock, request)
    except OSError as e:
        return _lost(f"refused the request: {e}")
    while True:
        try:
            msg = read_message(sock)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        except OSError as e:
            return _lost(f"connection failed: {e}")
        if msg is None:
            return _lost("went away before its rank exited"
                         + (f" (rank pid {child[0]})" if child[0] else ""))
        if "pid" in msg:
            child[0] = int(msg["pid"])
            for signum in pending:
                forward(signum, None)
            pending.clear()
        elif "exit" in msg:
            _exit_like(int(msg["exit"]))


if __name__ == "__main__":
    sys.exit(main())
