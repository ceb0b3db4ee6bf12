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

from typing import Any

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
    configuration (named in the one table, scenarios/judge/differential.py
    KNOWN_DIFFERENCES) taken out so that what remains is a difference of behaviour.

    - KNOWN_DIFFERENCES["host_pool_pages"]: the reference's host pool has SGLang's size
      (`sglang_host_pages`).
    - KNOWN_DIFFERENCES["storage_batch_pages"]:

      SGLang's prefetch IO batch is fixed (SGLANG_STORAGE_BATCH_PAGES); the reference runs
      at it. Without this, `prefetch_partial` and `prefetch_error` on 0.5.11 / 0.5.13 insert
      a batch of 1 page (reference) vs the whole 6-page batch (SGLang) at their first
      `prefetch_done`.
    """
    cache = s.cache.model_copy(update={"prefetch_batch_pages": SGLANG_STORAGE_BATCH_PAGES,
                                       "host_pages": sglang_host_pages(s.cache)})
    return s.with_(cache=cache.model_dump())


def sglang_host_pages(cache: Any) -> int:
    """KNOWN_DIFFERENCES["host_pool_pages"]: the host pages SGLang's pool has for a Schedule's
    cache: the driver asks for at least one page more than the device pool (SGLang asserts
    host > device), and `HostKVCache` adds one page when it aligns its size
    (`page_num = size // page_size + 1`)."""
    ps, device = cache.page_size, cache.device_pages * cache.page_size
    host = max(cache.host_pages, cache.device_pages + 1) * ps  # what the driver asks for
    return int(device * (host / device)) // ps + 1  # its hicache_ratio, as SGLang sizes it


def _rows(results: list[dict]) -> dict[int, list[tuple]]:
    from scenarios.judge.differential import decision_rows

    return {r.rank: decision_rows(r) for r in results}


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


class DifferentialExecutor:
    """A `SutExecutor` (scenarios/sut/__init__.py) that runs each Schedule on the reference
    profile modelling release `version` (threads, as SGLang's schedule asks but for
    `as_sglang_runs_it`) and on the release itself, and judges the difference between the two
    (scenarios/judge/differential.py), not the ranks of one. The hunt, shrinking and replay
    confirmation work on it as on any SUT; `run` returns SGLang's ranks (what coverage and
    steering read)."""

    mode = "torchrun"
    hangs_are_findings = False

    def __init__(self, version: str, protocol: str | None = None, *, timeout_s: float = 20.0,
                 sglang: Any = None, reference: Any = None) -> None:
        from scenarios.core.suts import sglang as sglang_name
        from scenarios.sut.reference_executor import Executor
        from scenarios.sut.sglang.executor import SglangExecutor

        self.version = version
        self.protocol = protocol or profile_for(version)
        self.sut = sglang_name(version)
        #: executors passed in (a test's shared pool) stay open for their owner
        self._owned = (sglang is None, reference is None)
        self.sglang = sglang or SglangExecutor(version, timeout_s=timeout_s)
        self.reference = reference or Executor("inprocess", timeout_s=timeout_s)
        self._ref_results: dict[str, list[Any]] = {}

    def reference_schedule(self, s: Any) -> Any:
        return as_sglang_runs_it(s).with_(sut="reference", protocol=self.protocol)

    def run(self, s: Any, *, gated: bool = True, nemesis: Any = None) -> list[Any]:
        s = s.with_(sut=self.sut)
        ref = self.reference.run(self.reference_schedule(s), gated=gated)
        self._ref_results = {s.digest(): ref}  # the last run's, for `judge`
        return self.sglang.run(s, gated=gated)

    def observed(self, s: Any, results: list[Any]) -> tuple[Any, list[Any]]:
        """What coverage reads: the reference's run of this Schedule (both sides ran it; the
        reference logs every prefetch's hit query and ending, which SGLang's ranks do not
        expose, so a hunt's prefetch classes would all read 0)."""
        ref = self._ref_results.get(s.with_(sut=self.sut).digest())
        return (self.reference_schedule(s), ref) if ref is not None else (s, results)

    def judge(self, s: Any, results: list[Any]) -> Any:
        from scenarios.core.verdict import Verdict
        from scenarios.judge.differential import differential_verdict
        from scenarios.judge.judging import infrastructure

        ref = self._ref_results.get(s.with_(sut=self.sut).digest())
        if ref is None:
            return Verdict.unknown("differential: no reference run for this schedule")
        broke = infrastructure(ref)
        if broke:
            return Verdict.unknown(f"reference: {broke}")
        v = differential_verdict(ref, results, f"reference {self.protocol} vs SGLang "
                                               f"{self.version}")
        v.stats["differential"] = {"release": self.version, "protocol": self.protocol}
        return v

    def close(self) -> None:
        for owned, ex in zip(self._owned, (self.sglang, self.reference), strict=True):
            if owned:
                ex.close()

    def __enter__(self) -> DifferentialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def differential(s: Any, version: str, protocol: str | None = None,
                 timeout: float = 20.0, ex: DifferentialExecutor | None = None) -> tuple[bool, str]:
    """Run `s` once on both sides: (agree, the verdict line)."""
    from scenarios.judge.judging import run_checked

    own = ex is None
    ex = ex or DifferentialExecutor(version, protocol, timeout_s=timeout)
    try:
        _, v = run_checked(ex, s)
    finally:
        if own:
            ex.close()
    return v.ok, v.summary()


def _load(name_or_path: str) -> tuple[Any, dict]:
    """A catalog name, .toml, or a replay .json (whose `differential` record names the release
    and the profile it was found with)."""
    from scenarios.generate.catalog import load_scenario

    if name_or_path.endswith(".json"):
        from scenarios.store.replay import read_replay

        try:
            return read_replay(name_or_path)
        except Exception as e:  # a bare Schedule .json (no replay wrapper) loads as before
            from scenarios.core.errors import ScheduleError

            if not (isinstance(e, ScheduleError) and "no 'schedule'" in str(e)):
                raise
    return load_scenario(name_or_path), {}


def diff_one(scenario: str, *, sut: str | None = None, protocol: str | None = None,
             layout: str | None = None, dp_attention: bool | None = None,
             timeout: float = SGLANG_AGREEMENT_S) -> int:
    """`cpcheck diff`: one Schedule (a catalog name, a file, a differential replay file) on
    the reference profile of a release and on the release; the exit code of the verdict."""
    from scenarios.core.errors import UsageError
    from scenarios.judge.judging import confirm, run_checked
    from scenarios.sut.sglang.executor import parse_sut

    s, data = _load(scenario)
    if layout:
        s = s.with_(layout=layout)
    if dp_attention is not None:
        s = s.with_(dp_attention=dp_attention)
    recorded = data.get("differential") or {}
    sut = sut or (f"sglang=={recorded['release']}" if recorded.get("release") else None)
    version = parse_sut(sut) if sut else None
    if version is None:
        raise UsageError("diff needs --sut sglang==VERSION (or a differential replay file)")
    protocol = protocol or recorded.get("protocol")
    with DifferentialExecutor(version, protocol, timeout_s=timeout) as ex:
        _, v = run_checked(ex, s)
        v = confirm(ex, s, v)  # a difference is replayed once before it is reported
    print(v.summary())
    for inv, msg in v.failures[1:6]:
        print(f"  also [{inv}]: {msg}")
    return v.exit_code


def differential_soak(version: str, layout: str, minutes: float, seed: int, out: Any, *,
                      protocol: str | None = None, timeout: float = 20.0,
                      dp_attention: bool = True, examples_per_round: int = 25) -> int:
    """Differential hunts with seeds seed, seed + 1, ... until `minutes` are spent or one
    finds a confirmed difference (its replay file goes to `out`). Returns the exit code."""
    import time

    from scenarios.campaigns.explore import hunt
    from scenarios.generate.strategies import for_sut
    from scenarios.store.replay import write_replay

    deadline = time.monotonic() + minutes * 60
    strategy = for_sut(f"sglang=={version}", (layout,), dp_attention=dp_attention)
    total = rounds = 0
    with DifferentialExecutor(version, protocol, timeout_s=timeout) as ex:
        while time.monotonic() < deadline:
            h = hunt(ex, strategy, examples_per_round, seed + rounds)
            total, rounds = total + h.examples, rounds + 1
            if h.verdict is not None and h.verdict.status != "agree":
                print(h.verdict.summary())
                if h.verdict.status == "diverge":
                    path = write_replay(h.found, h.verdict, out, "torchrun")
                    print(f"replay: cpcheck diff {path}")
                return h.verdict.exit_code
            if h.infra_errors:  # a run the machine broke judges nothing: say so, stop
                print(f"UNKNOWN: {len(h.infra_errors)} runs could not be judged: "
                      f"{h.infra_errors[0][:300]}")
                return int(ExitCode.UNKNOWN)
            print(f"round {rounds} (seed {seed + rounds - 1}): {h.examples} schedules agree "
                  f"({h.seconds_total:.1f} s)", flush=True)
    print(f"AGREE: reference {ex.protocol} vs SGLang {version}: {total} schedules in "
          f"{rounds} rounds (seed {seed})")
    return int(ExitCode.AGREE)
