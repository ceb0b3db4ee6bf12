"""The Mooncake master a command runs against: the one given, one started here, or none.

Shared by `cli` (run / replay / explore) and `soak`, so neither imports the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scenarios.core.errors import CannotRun


def probe_master(address: str) -> None:
    """CannotJudge unless `address` answers as a Mooncake master (a client can register)."""
    from scenarios.nemesis.mooncake_master import check_master_reachable, mooncake_available

    check_master_reachable(address, timeout=3.0)
    ok, _ = mooncake_available(need_binary=False)
    if not ok:  # no client here (torchrun workers may have one): TCP is all we can check
        return
    from reference.api import MooncakeConfig, MooncakeStorage, StorageError

    try:
        MooncakeStorage(MooncakeConfig(master_address=address, global_segment_size=4 << 20,
                                       local_buffer_size=4 << 20)).close()
    except StorageError as e:
        raise CannotRun(f"{address} does not answer as a Mooncake master: {e}") from None


@contextlib.contextmanager
def mooncake_for(backend: str | None, address: str,
                 log_dir: Path | None = None) -> Iterator[tuple[str, Any]]:
    """(address, master) to use: the address given (master None), a master the harness starts
    and always stops (so a nemesis may restart it), or ("", None) for other backends.
    With `log_dir`, the master's own log is kept there as mooncake_master.log."""
    if backend != "mooncake":
        yield address, None
        return
    from scenarios.nemesis.mooncake_master import MooncakeMaster, mooncake_available

    if address:
        probe_master(address)
        yield address, None
        return
    ok, why = mooncake_available()
    if not ok:
        raise CannotRun(f"backend 'mooncake' is not available here: {why}")
    master = MooncakeMaster(keep_log=log_dir is not None)
    if log_dir is not None:
        master.log_path = str(Path(log_dir) / "mooncake_master.log")
    with master:
        yield master.address, master
