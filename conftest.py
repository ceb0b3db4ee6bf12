"""Root fixtures: Hypothesis profiles, rank executors and the Mooncake master.

Markers are declared in pyproject.toml (with --strict-markers). Under pytest-xdist each worker
has its own executors and master (ports are picked by the kernel, names are unique per run), and
the executors' rank timeouts grow with the number of workers sharing the cores.

Profiles: `dev` (quick), `ci` (derandomized, bounded: the default under CI=true), `nightly`
(many examples). Pick one with `--hypothesis-profile NAME` or CPCHECK_HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.mooncake_fixtures"]

settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("CPCHECK_HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))


def rank_timeout(seconds: float) -> float:
    """A rank timeout for this run: under pytest-xdist the workers share the cores, so each
    waits as many times longer as there are workers (PYTEST_XDIST_WORKER_COUNT)."""
    return seconds * max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _sglang_executors() -> Iterator[None]:
    """The SGLang executors test modules share (tests/sglang_envs.py), closed once at the end."""
    yield
    from tests.sglang_envs import close_shared

    close_shared()


@pytest.fixture(scope="session")
def inprocess_executor() -> Iterator:
    from scenarios.sut.reference_executor import Executor

    with Executor("inprocess", timeout_s=rank_timeout(3.0)) as ex:
        yield ex


@pytest.fixture(scope="session")
def torchrun_executor() -> Iterator:
    """One executor for the session: its rank pools live across tests (starting one costs s)."""
    from scenarios.sut.reference_executor import Executor

    with Executor("torchrun", timeout_s=rank_timeout(5.0)) as ex:
        yield ex
