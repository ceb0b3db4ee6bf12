"""Shared by the `sglang`-marked tests: which release environments are built here, and
executors (long-lived pools) for them. A missing environment skips with the command that
builds it; it is never counted as a pass."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scenarios.sut.sglang import envs

#: the last release before PR #20460 and the first after it (what CI builds, with 0.5.20)
PRE, POST = "0.5.10.post1", "0.5.11"


def built(version: str) -> bool:
    m = envs.load_manifest(version)
    return m is not None and m.ok and envs.release_dir(version).is_dir()


def need(*versions: str) -> None:
    missing = [v for v in versions if not built(v)]
    if missing:
        pytest.skip(f"sglang env not built here: python -m scenarios.sut.sglang.envs {' '.join(missing)}")


def driving_hiradix_cache() -> Iterator[None]:
    """The SGLang SUT builds HiRadixCache instead of what the release's server builds
    (UnifiedRadixCache from 0.5.19): for tests that pin down that class in a newer release."""
    from scenarios.sut.sglang.executor import CACHE_CLASS_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_CLASS_ENV, "HiRadixCache")
        yield


def started(*versions: str) -> Iterator[dict[str, Any]]:
    """For a module fixture: one executor per release, closed (pools and masters) after."""
    from scenarios.sut.sglang.executor import SglangExecutor

    need(*versions)
    exs = {v: SglangExecutor(v, timeout_s=20, build=False) for v in versions}
    try:
        yield exs
    finally:
        for ex in exs.values():
            ex.close()


def verdicts_by_release(executors: dict[str, Any], s: Any, data: dict) -> Iterator[tuple]:
    """(sut, expected invariant, verdict) for each release a corpus file names whose executor
    is here (`expect_by_release`: None = agrees)."""
    for sut, invariant in data["expect_by_release"].items():
        version = sut.split("==")[1]
        if version in executors:
            yield sut, invariant, executors[version].check(s.with_(sut=sut))


class IdleExecutor:
    """Stands in for `SglangExecutor` where a test scripts what a run returns: takes any
    arguments and starts nothing (a subclass adds the calls the test needs)."""

    sut = "sglang==0.0.0"
    mode = "torchrun"
    hangs_are_findings = False

    def __init__(self, *a: object, **k: object) -> None:
        pass

    def run(self, s: Any, *a: object, **k: object) -> list:
        return []

    def judge(self, s: Any, results: list) -> Any:
        return self.check(s)

    def check(self, s: Any) -> Any:
        raise NotImplementedError("a subclass scripts the verdict")

    def close(self) -> None:
        pass

    def __enter__(self) -> IdleExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
