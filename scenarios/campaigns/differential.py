"""Differential mode: one Schedule on the reference (the profile that models a release) and on
that SGLang release; name the first scheduler decision where they differ.

Both SUTs log the scheduler's decisions under the same kinds and outcome texts
(writing_check "ack N writes", loading_check "ack N loads", drain "revoke a, backup acks b,
release c", can_terminate "terminate"/"wait", prefetch_done "insert N tokens"), and both read the
Schedule's choices in the same order per step (write, load, storage backup, prefetch IO), so the
decision sequences are comparable rank by rank. The agreed tuple of can_terminate is not
compared (the reference logs the MAX pair, SGLang only exposes the boolean).
"""

from __future__ import annotations

import argparse
from typing import Any

from reference.api import DP_ATTENTION_CHOICES
from scenarios.core.contract import ExitCode
from scenarios.core.releases import profile_for
from scenarios.core.timeouts import SGLANG_AGREEMENT_S

#: SGLang's prefetch IO batch, in pages: 128 in every release driven, not a setting (0.5.11
#: `HiCacheController.storage_batch_size = 128`; 0.5.13+ `hicache_storage.STORAGE_BATCH_SIZE`).
#: A Schedule's `prefetch_batch_pages` sizes only the reference's batches, so a Schedule's
#: "n batches in" choices mean other pages on the two SUTs unless both batch alike.
SGLANG_STORAGE_BATCH_PAGES = 128


def as_sglang_runs_it(s: Any) -> Any:
    """The Schedule the reference runs in differential mode: the known differences of
    configuration, each named here with the release code it comes from, taken out so that
    what remains is a difference of behaviour.

    - prefetch IO batch: SGLang's is fixed (SGLANG_STORAGE_BATCH_PAGES); the reference runs
      at it. Without this, `prefetch_partial` and `prefetch_error` on 0.5.11 / 0.5.13 insert
      a batch of 1 page (reference) vs the whole 6-page batch (SGLang) at their first
      `prefetch_done`.
    """
    cache = s.cache.model_copy(update={"prefetch_batch_pages": SGLANG_STORAGE_BATCH_PAGES})
    return s.with_(cache=cache.model_dump())


def _rows(results: list[dict]) -> dict[int, list[tuple]]:
    # an outcome's words after ";" are what only one SUT has (0.5.16+'s hit queue): not compared
    return {r.rank: [(d.kind, d.rid, str(d.outcome).split(";")[0])
                     for d in r.decisions.get("scheduler", ())] for r in results}


def first_difference(ref: list[dict], sgl: list[dict]) -> tuple[int, int, Any, Any] | None:
    """(rank, index, reference row, sglang row) of the earliest differing decision."""
    from scenarios.judge.checker import first_mismatch

    a, b = _rows(ref), _rows(sgl)
    best = None
    for rank in sorted(set(a) & set(b)):
        m = first_mismatch(a[rank], b[rank])
        if m is not None and (best is None or m[0] < best[1]):
            best = (rank, m[0], m[1], m[2])
    return best


def differential(s: Any, version: str, protocol: str | None = None,
                 timeout: float = 20.0) -> tuple[bool, str]:
    from scenarios.core.schedule import Schedule
    from scenarios.sut.reference_executor import Executor
    from scenarios.sut.sglang.executor import SglangExecutor

    protocol = protocol or profile_for(version)
    ref_s = as_sglang_runs_it(s).with_(sut="reference")
    if "protocol" in Schedule.model_fields:
        ref_s = ref_s.with_(protocol=protocol)
        label = f"reference {protocol}"
    else:  # the profiles land with branch p9; until then the reference models main
        label = "reference (no release profiles at this commit: models main)"
    with Executor("inprocess", timeout_s=timeout) as ex:
        ref = ex.run(ref_s)
    with SglangExecutor(version, timeout_s=timeout) as sx:
        sgl = sx.run(s.with_(sut=f"sglang=={version}"))
    d = first_difference(ref, sgl)
    if d is None:
        n = len(_rows(sgl).get(0, []))
        return True, f"{label} and SGLang {version} agree on all {n} scheduler decisions"
    rank, i, x, y = d
    return False, (f"{label} and SGLang {version} disagree at scheduler decision #{i} on rank "
                   f"{rank}: reference {x} vs SGLang {y}")


def cmd_diff(args: argparse.Namespace) -> int:
    from scenarios.generate.catalog import load_scenario
    from scenarios.sut.sglang.executor import parse_sut

    s = load_scenario(args.scenario)
    if args.layout:
        s = s.with_(layout=args.layout)
    if args.dp_attention:
        s = s.with_(dp_attention=args.dp_attention == "on")
    version = parse_sut(args.sut)
    if version is None:
        from scenarios.core.errors import UsageError

        raise UsageError("diff needs --sut sglang==VERSION")
    same, msg = differential(s, version, args.protocol, args.timeout)
    print(msg)
    return int(ExitCode.AGREE if same else ExitCode.DIVERGE)


def add_diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="a catalog name, .toml, or a replay .json")
    p.add_argument("--sut", required=True, help="sglang==VERSION")
    p.add_argument("--protocol", default=None, help="reference profile (default: the one "
                   "modelling the release)")
    p.add_argument("--layout")
    p.add_argument("--dp-attention", choices=DP_ATTENTION_CHOICES, default=None,
                   help="default: the scenario's")
    p.add_argument("--timeout", type=float, default=SGLANG_AGREEMENT_S,
                   help="seconds a rank waits at one agreement (every other wait derives from it)")
