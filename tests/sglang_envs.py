"""Shared by the `sglang`-marked tests: which release environments are built here, and
executors (long-lived pools) for them. A missing environment skips with the command that
builds it; it is never counted as a pass."""

from __future__ import annotations

import os
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


#: executors kept warm across test modules (one pool start per release and layout instead of one
#: per module), least recently used first; at most `SHARED_MAX` alive, each holding its pools
_SHARED: dict[tuple[str, ...], Any] = {}
SHARED_MAX = 3


def shared(version: str) -> Any:
    """This process's executor for `version` and the environment its workers read at start
    (the cache class and the idle reset), started on first use and kept for later modules."""
    from scenarios.sut.sglang.executor import CACHE_CLASS_ENV, SglangExecutor
    from scenarios.sut.sglang.quick_reset import IDLE_RESET_ENV

    key = (version, os.environ.get(CACHE_CLASS_ENV, ""), os.environ.get(IDLE_RESET_ENV, ""))
    ex = _SHARED.pop(key, None)
    if ex is None:
        ex = SglangExecutor(version, timeout_s=20, build=False)
    _SHARED[key] = ex  # now the most recently used
    while len(_SHARED) > SHARED_MAX:
        _SHARED.pop(next(iter(_SHARED))).close()
    return ex


def close_shared() -> None:
    """Close every kept executor (pools and Mooncake masters): at the end of the session."""
    while _SHARED:
        _SHARED.popitem()[1].close()


def started(*versions: str) -> Iterator[dict[str, Any]]:
    """For a module fixture: one executor per release, shared with the other modules that ask
    for the same release (`shared`) and closed at the end of the session."""
    need(*versions)
    yield {v: shared(v) for v in versions}


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
