"""Judging one Schedule on SGLang releases, as the release walk and the matrix do."""

from __future__ import annotations

from typing import Any

from scenarios.core.suts import check, sglang_tree, sglang_version
from scenarios.core.verdict import Verdict
from scenarios.judge.judging import run_checked
from scenarios.sut.sglang.executor import SglangExecutor


def with_sut(s: Any, sut: str | None, dp: bool | None = None) -> Any:
    """`s` on another SUT and / or DP attention setting (a bad SUT name is a usage error)."""
    changes: dict[str, Any] = {}
    if sut:
        check(sut)
        changes["sut"] = sut
    if dp is not None:
        changes["dp_attention"] = dp
    return s.with_(**changes) if changes else s


def judge(s: Any, *, timeout: float = 20.0, mooncake_master: str = "") -> tuple[int, Verdict]:
    """(exit code, verdict) of one run of `s` on its release, not replayed (a walk over
    releases compares verdicts; `unknown`, 125, when the machine broke the run)."""
    tree = sglang_tree(s.sut)
    version = None if tree else sglang_version(s.sut)
    if version is None and tree is None:
        from scenarios.core.errors import UsageError

        raise UsageError("judge() is for sglang SUTs")
    with SglangExecutor(version or "", tree=tree, timeout_s=timeout,
                        mooncake_master=mooncake_master) as ex:
        _, v = run_checked(ex, s)
    return v.exit_code, v
