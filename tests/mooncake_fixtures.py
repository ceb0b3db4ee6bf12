"""Pytest plugin: a Mooncake master for the tests, owned by the session or by one test.

Listed in the root conftest's `pytest_plugins`. Without Mooncake installed, tests that use
these fixtures are skipped with the reason (never failed); every other problem fails.
`--mooncake-master HOST:PORT` runs the tests against an existing master instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scenarios.nemesis.mooncake_master import (
    MooncakeMaster,
    check_master_reachable,
    mooncake_available,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mooncake")
    group.addoption(
        "--mooncake-master",
        action="store",
        default=None,
        metavar="HOST:PORT",
        help="use this running Mooncake master instead of starting one for the session",
    )


def _require_mooncake(need_binary: bool = True) -> None:
    ok, reason = mooncake_available(need_binary=need_binary)
    if not ok:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def mooncake_master(request: pytest.FixtureRequest) -> Iterator[str]:
    """The "HOST:PORT" of a master shared by the session (started here unless given)."""
    address = request.config.getoption("--mooncake-master")
    if address:
        _require_mooncake(need_binary=False)
        check_master_reachable(address, timeout=5.0)  # an explicit master must work: fail
        yield address
        return
    _require_mooncake()
    with MooncakeMaster() as master:
        yield master.address


@pytest.fixture
def fresh_mooncake_master() -> Iterator[MooncakeMaster]:
    """A master only this test uses, for tests that stop or restart it."""
    _require_mooncake()
    with MooncakeMaster() as master:
        yield master


def close_all(clients: list[Any], timeout: float = 30.0) -> None:
    """Close clients concurrently: each Mooncake close() waits 1-3 s for its heartbeat."""
    threads = [threading.Thread(target=c.close, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    clients.clear()


@pytest.fixture
def mooncake_client_factory(mooncake_master: str) -> Iterator[Callable[..., Any]]:
    """Makes MooncakeStorage clients on the session master; closes them all afterwards.

    Keyword arguments override MooncakeConfig fields; `address=` picks another master.
    """
    from reference.api import MooncakeConfig, MooncakeStorage

    made: list[Any] = []

    def make(address: str | None = None, **overrides: Any) -> MooncakeStorage:
        client = MooncakeStorage(MooncakeConfig(address or mooncake_master, **overrides))
        made.append(client)
        return client

    try:
        yield make
    finally:
        close_all(made)
