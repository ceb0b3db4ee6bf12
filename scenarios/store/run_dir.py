"""One soak, one directory: a fresh run dir under `--out`, a `latest` link, and a lock.

Two soaks given the same `--out` used to write the same report.json (one was lost) and a
second soak left the first one's plots and logs beside its own. Now each soak claims a new
directory named by its start time and seed, holds an exclusive lock on it for its lifetime
(a second writer of the same directory is refused, exit 2), and points `latest` at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from scenarios.core.errors import UsageError

LOCK_NAME = ".lock"
LATEST = "latest"


class RunDir:
    """A claimed run dir: `path`, locked until `release()` (the kernel drops the lock if the
    process dies, so a SIGKILLed soak never blocks the next one)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def claim(cls, path: Path) -> RunDir:
        """Lock `path` (made if missing); UsageError if another process holds it."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"--out {path}: not writable ({e.strerror or type(e).__name__})"
                             ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"--out {path}: another cpcheck soak is writing there") from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    @classmethod
    def fresh(cls, out: Path, seed: int, now: float | None = None) -> RunDir:
        """A new run dir `out/YYYYmmdd-HHMMSS-seedN[-K]`, claimed, with `out/latest` to it."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None
                                                            else time.time()))
        base = f"{stamp}-seed{seed}"
        for k in range(1, 1000):
            path = out / (base if k == 1 else f"{base}-{k}")
            try:
                path.mkdir(parents=True)
            except FileExistsError:
                continue  # another soak started in the same second with the same seed
            except OSError as e:
                raise UsageError(f"--out {out}: not writable ({e.strerror or type(e).__name__})"
                                 ) from None
            run = cls.claim(path)
            point_latest(out, path.name)
            return run
        raise UsageError(f"--out {out}: 999 soaks with seed {seed} started in one second")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing drops the flock; the file stays (harmless)


def point_latest(out: Path, name: str) -> None:
    """`out/latest` -> `name`, replaced atomically (best effort: a link is a convenience)."""
    tmp = out / f".{LATEST}.{os.getpid()}"
    with contextlib.suppress(OSError):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(name)
        os.replace(tmp, out / LATEST)
