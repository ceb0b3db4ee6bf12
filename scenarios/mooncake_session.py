"""The Mooncake master a command runs against: the one given, one started here, or none.

Shared by `cli` (run / replay / explore) and `soak`, so neither imports the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from scenarios.contract import CannotJudge


class CannotRun(CannotJudge):
    """This machine cannot run what was asked (Mooncake missing, too few ranks): exit 125."""


@contextlib.contextmanager
def mooncake_for(backend: str | None, address: str) -> Iterator[tuple[str, Any]]:
    """(address, master) to use: the address given (master None), a master the harness starts
    and always stops (so a nemesis may restart it), or ("", None) for other backends."""
    if backend != "mooncake":
        yield address, None
        return
    from scenarios.mooncake_master import MooncakeMaster, check_master_reachable, mooncake_available

    if address:
        check_master_reachable(address, timeout=3.0)
        yield address, None
        return
    ok, why = mooncake_available()
    if not ok:
        raise CannotRun(f"backend 'mooncake' is not available here: {why}")
    with MooncakeMaster() as master:
        yield master.address, master
