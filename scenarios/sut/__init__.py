"""Systems under test, one adapter each: our reference HiCache and SGLang's own releases.

Every SUT is driven the same way: a `SutRank` per rank under the one client loop
(scenarios/client/loop.py), and a `SutExecutor` that runs a whole Schedule on every rank and
reads the checker's verdict as that SUT's behaviour allows. Campaigns and the command line
only ever hold a `SutExecutor`, chosen by `executor_for`.
"""

from __future__ import annotations

from typing import Any, Protocol

from scenarios.core.records import RankResult
from scenarios.core.schedule import Schedule
from scenarios.core.suts import REFERENCE, sglang_tree, sglang_version
from scenarios.core.timeouts import DEFAULT_AGREEMENT_S, SGLANG_AGREEMENT_S
from scenarios.core.verdict import Verdict


class SutExecutor(Protocol):
    """Runs Schedules on one system under test and owns what lives across runs."""

    sut: str  # "reference", "sglang==VERSION" or "sglang@PATH"
    mode: str  # "inprocess" or "torchrun"
    #: a run whose ranks never finish is a finding (the SUT froze), not the harness's trouble
    hangs_are_findings: bool

    def run(self, s: Schedule, *, gated: bool = True, nemesis: Any = None) -> list[RankResult]:
        """Every rank's result; raises only for the runner's own failures (RankPoolError...)."""

    def judge(self, s: Schedule, results: list[RankResult]) -> Verdict:
        """The checker's verdict, as this SUT's documented behaviour reads it."""

    def close(self) -> None: ...

    def __enter__(self) -> SutExecutor: ...

    def __exit__(self, *exc: object) -> None: ...


def executor_for(sut: str, mode: str = "inprocess", *, timeout_s: float | None = None,
                 mooncake_master: str = "", device: str = "auto",
                 log: Any = None, nnodes: int = 1,
                 rdzv_endpoint: str | None = None,
                 placement: str | None = None) -> SutExecutor:
    """The executor of `sut` ("reference", "sglang==V" or "sglang@PATH"). SGLang runs under
    torchrun only (one release's environment per worker), so `mode` applies to the reference."""
    tree = sglang_tree(sut)
    version = None if tree else sglang_version(sut or REFERENCE)
    if version is None and tree is None:
        from scenarios.sut.reference_executor import Executor

        return Executor(mode, timeout_s=timeout_s or DEFAULT_AGREEMENT_S, mooncake_master=mooncake_master,
                        device=device, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                        placement=placement)
    if nnodes > 1:
        raise ValueError(f"--nnodes {nnodes}: SGLang as the SUT runs on one host here")
    from scenarios.sut.sglang.executor import SglangExecutor

    return SglangExecutor(version or "", tree=tree, timeout_s=timeout_s or SGLANG_AGREEMENT_S,
                          mooncake_master=mooncake_master, **({"log": log} if log is not None else {}))
