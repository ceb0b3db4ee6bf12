"""Root fixtures: markers, Hypothesis profiles, rank executors and the Mooncake master.

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


def pytest_configure(config: pytest.Config) -> None:
    for name, what in (
        ("cp", "multi-rank runs under torchrun (uses the GPUs on GPU runners)"),
        ("soak", "long free-running soak runs (excluded by default)"),
        ("gpu", "needs a CUDA device"),
        ("mooncake", "needs Mooncake and starts a real master on 127.0.0.1"),
        ("sglang", "SGLang's own HiCache as the SUT (needs build/sglang-envs: "
                   "python -m scenarios.sglang.envs 0.5.10.post1 0.5.11)"),
    ):
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def inprocess_executor() -> Iterator:
    from scenarios.executor import Executor

    with Executor("inprocess", timeout_s=3.0) as ex:
        yield ex


@pytest.fixture(scope="session")
def torchrun_executor() -> Iterator:
    """One executor for the session: its rank pools live across tests (starting one costs s)."""
    from scenarios.executor import Executor

    with Executor("torchrun", timeout_s=5.0) as ex:
        yield ex
