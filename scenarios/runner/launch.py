"""torchrun, plus a JSON record of which rank failed how, for :class:`~.torchrun_pool.RankPool`.

``python -m scenarios.runner.launch <torchrun arguments>`` runs ``torch.distributed.run``'s own
parser and ``run``. When a worker fails, torch elastic raises ``ChildFailedError`` whose
``failures`` map each failed global rank to a ``ProcessFailure`` (exit code, pid, the worker's
error file written by ``@record``); this launcher writes them as JSON to the path in
:data:`ENV_FAILURES` and exits 1 as torchrun does, so the pool reads the root cause instead of
scraping torchrun's log text. Importing this module does not import torch (the pool imports it).

With :data:`ENV_STORE_BIND` set, the TCPStore servers torchrun's agent hosts (the c10d
rendezvous store and the workers' store) listen on that address only: torch binds them to every
interface (``[::]``) whatever host it is given, so the launcher hands each one a socket it bound
itself (``master_listen_fd``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ENV_FAILURES", "FailureReport", "RankFailure", "read_failures", "write_failures"]

#: Where the launcher writes the failure record (set by the pool; absent: nothing is written).
ENV_FAILURES = "CPCHECK_POOL_FAILURES"
#: The address the agent's TCPStore servers listen on (set by the pool: 127.0.0.1 on one host)
ENV_STORE_BIND = "CPCHECK_STORE_BIND"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RankFailure:
    """One failed worker as torch elastic saw it (``ProcessFailure``, flattened to JSON)."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    signal: str  # "SIGKILL" for exitcode -9, "" for a plain exit code
    timestamp: int  # seconds since the epoch: from the worker's error file, else when it was seen
    message: str  # "RuntimeError: ..." from the error file, or torch's text for a signal / exit
    traceback: str  # the worker's Python traceback (``@record``), "" when it wrote no error file
    error_file: str

    def describe(self) -> str:
        """``killed by SIGKILL`` / ``exit code 3``."""
        if self.exitcode < 0:
            return f"killed by {self.signal or f'signal {-self.exitcode}'}"
        return f"exit code {self.exitcode}"


@dataclass(frozen=True)
class FailureReport:
    """Every failed rank of one torchrun run and the root cause (torch's first failure)."""

    root_cause: int
    failures: dict[int, RankFailure]

    @property
    def first(self) -> RankFailure:
        return self.failures[self.root_cause]


def _signal_name(exitcode: int) -> str:
    if exitcode >= 0:
        return ""
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return ""


def _flatten(rank: int, failure: Any) -> RankFailure:
    """A torch ``ProcessFailure`` -> :class:`RankFailure` (its message is a str or a dict)."""
    message: Any = failure.message
    traceback = ""
    if isinstance(message, dict):  # written by @record: {"message", "extraInfo": {"py_callstack"}}
        traceback = str(message.get("extraInfo", {}).get("py_callstack", ""))
        message = message.get("message", "")
    return RankFailure(
        rank=int(rank),
        local_rank=int(failure.local_rank),
        pid=int(failure.pid),
        exitcode=int(failure.exitcode),
        signal=_signal_name(int(failure.exitcode)),
        timestamp=int(failure.timestamp),
        message=str(message),
        traceback=traceback,
        error_file=str(failure.error_file),
    )


def write_failures(path: str | os.PathLike[str], error: Any) -> FailureReport:
    """Write a ``ChildFailedError``'s failures as JSON (atomically) and return them."""
    root, _ = error.get_first_failure()  # torch's rule: the smallest timestamp
    report = FailureReport(
        root_cause=int(root),
        failures={int(r): _flatten(r, f) for r, f in error.failures.items()},
    )
    data = {
        "schema_version": SCHEMA_VERSION,
        "root_cause": report.root_cause,
        "failures": [asdict(f) for f in report.failures.values()],
    }
    tmp = Path(f"{os.fspath(path)}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return report


def read_failures(path: str | os.PathLike[str]) -> FailureReport | None:
    """The launcher's record, or None when there is none (torchrun killed, or no failure)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return None
    failures = {int(f["rank"]): RankFailure(**f) for f in data["failures"]}
    if not failures:
        return None
    root = int(data["root_cause"])
    if root not in failures:
        root = min(failures, key=lambda r: (failures[r].timestamp, r))
    return FailureReport(root_cause=root, failures=failures)


def bind_stores_to(host: str) -> None:
    """Make every TCPStore server this process starts listen on `host` only."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    base = dist.TCPStore
    if getattr(base, "cpcheck_bind", None) is not None:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class BoundTCPStore(base):  # type: ignore[misc, valid-type]
        cpcheck_bind = host

        def __init__(self, host_name: str, port: int, world_size: int | None = None,
                     is_master: bool = False, *args: Any, master_listen_fd: int | None = None,
                     **kw: Any) -> None:
            if is_master and master_listen_fd is None:
                try:
                    sock = socket.create_server((host, int(port)), family=family, backlog=512)
                except OSError:  # the port is taken (a multi-tenant store): torch's own way
                    sock = None
                if sock is not None:
                    port = sock.getsockname()[1]
                    master_listen_fd = sock.detach()
            super().__init__(host_name, port, world_size, is_master, *args,
                             master_listen_fd=master_listen_fd, **kw)

    dist.TCPStore = BoundTCPStore  # type: ignore[misc]
    c10d_rendezvous_backend.TCPStore = BoundTCPStore  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    """torchrun's ``main`` with the failure record; returns torchrun's exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if os.environ.get(ENV_STORE_BIND):
        bind_stores_to(os.environ[ENV_STORE_BIND])

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        path = os.environ.get(ENV_FAILURES)
        if path:
            write_failures(path, exc)
        print(exc.format_msg(), file=sys.stderr, flush=True)  # torchrun's summary, for people
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
