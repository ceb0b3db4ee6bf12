"""An executor keeps pools per layout, within a bound on live ranks (least recently used close
first): on one GPU every rank holds a CUDA context, and `pytest -m cp -n 8` on one H200 ran
CUDA out of memory creating contexts while each worker kept a pool of every layout alive."""

from __future__ import annotations

import pytest

from scenarios.sut.reference_executor import (
    CUDA_MAX_POOL_RANKS,
    MAX_POOL_RANKS_ENV,
    Executor,
    max_pool_ranks,
)


def test_bound_defaults_to_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_POOL_RANKS_ENV, raising=False)
    assert max_pool_ranks("cuda") == CUDA_MAX_POOL_RANKS >= 8  # the widest layout fits
    assert max_pool_ranks("cpu") == 0
    monkeypatch.setenv(MAX_POOL_RANKS_ENV, "3")
    assert max_pool_ranks("cpu") == max_pool_ranks("cuda") == 3


@pytest.mark.parametrize("bad", ["x", "-1", "2.5"])
def test_bad_bound_is_one_line(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(MAX_POOL_RANKS_ENV, bad)
    with pytest.raises(ValueError, match=MAX_POOL_RANKS_ENV):
        max_pool_ranks("cpu")


@pytest.mark.cp
def test_least_recently_used_pool_closes_when_the_bound_is_reached(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_POOL_RANKS_ENV, "4")
    with Executor("torchrun", timeout_s=10.0, device="cpu") as ex:
        a = ex.pool("1x2")
        b = ex.pool("2x1")
        assert a.running and b.running  # 4 ranks: within the bound
        assert ex.pool("1x2") is a  # a is now the most recently used
        c = ex.pool("1x1")
        assert not b.running and a.running and c.running  # b was the least recently used
        assert ex.pool("2x1") is not b
        assert not a.running  # 2 + 1 + 2 > 4: the oldest went first
