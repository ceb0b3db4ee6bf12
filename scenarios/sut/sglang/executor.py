"""Run Schedules against one SGLang release: a pool of long-lived workers per layout.

The workers are the harness's own torchrun pool (scenarios/runner), started with the release's
environment in front of PYTHONPATH; SGLang is imported once per pool, by the zygote the ranks
are forked from (~5-25 s), its parallel state is built once per worker, and each run builds a
fresh cache. A pool is dropped after any failed run (a gloo group
that timed out cannot be trusted).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

from scenarios.core import suts
from scenarios.core.config import REPO_ROOT
from scenarios.core.errors import CannotJudge, RankJobError, SglangSetupFailed, UsageError
from scenarios.core.verdict import Verdict
from scenarios.runner.pools import close_pools, drop_pool
from scenarios.sut.sglang import envs, mooncake

JOB = "scenarios.sut.sglang.rank:run_schedule"
CACHE_CLASS_ENV = "CPCHECK_SGLANG_CACHE_CLASS"
#: SGLang imported once per pool, in a zygote that forks the ranks (scenarios/runner/zygote.py)
PRELOAD = "scenarios.sut.sglang.rank:preload"
#: set (to anything): every rank imports SGLang itself, as before the zygote (for comparison)
NO_ZYGOTE_ENV = "CPCHECK_SGLANG_NO_ZYGOTE"
_REPO = REPO_ROOT


def parse_sut(sut: str) -> str | None:
    """'reference' -> None; 'sglang==V' -> 'V' (a release number this code can parse)."""
    v = suts.sglang_version(sut)
    if v is not None:
        envs.parse_release(v)
    return v


class SglangExecutor:
    """One SGLang release as a `SutExecutor` (scenarios/sut/__init__.py)."""

    mode = "torchrun"
    #: a job that outlives its timeout is the pool's trouble, not SGLang's: its gloo groups are
    #: made to time out inside the run, so a hang of the release shows as a rank's error
    hangs_are_findings = False

    def __init__(self, version: str, *, timeout_s: float = 20.0, build: bool = True,
                 log: Any = print, mooncake_master: str = "", cache_class: str = "") -> None:
        envs.check_runnable(version)
        self.version = version
        self.sut = suts.sglang(version)
        #: "server": the cache the release's server builds (server_cache.py); "HiRadixCache":
        #: that class, where the release still defines it but its server no longer builds it
        #: (the environment variable CPCHECK_SGLANG_CACHE_CLASS sets it for the command line)
        self.cache_class = cache_class or os.environ.get(CACHE_CLASS_ENV) or "server"
        self.timeout_s = timeout_s
        if build:
            envs.build_release(version, log=log)
        elif envs.load_manifest(version) is None or not envs.load_manifest(version).ok:
            raise CannotJudge(f"no built environment for sglang {version}: run "
                              f"python -m scenarios.sut.sglang.envs {version}")
        check_pipeline(version)
        self.storage_root = tempfile.mkdtemp(prefix="cpcheck-sgl-store-")
        self._pools: dict[str, Any] = {}
        self.mooncake = mooncake.MasterHolder(mooncake_master)

    def __enter__(self) -> SglangExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pool(self, layout: str, dp_attention: bool) -> Any:
        from scenarios.runner import RankPool

        key = layout  # DP attention is per run: the parallel state is the same either way
        pool = self._pools.get(key)
        if pool is None or not pool.running:
            pp = os.pathsep.join([str(_REPO), envs.pythonpath(self.version)]
                                 + ([os.environ["PYTHONPATH"]]
                                    if os.environ.get("PYTHONPATH") else []))
            pool = RankPool(layout, device="cpu", collective_timeout_s=self.timeout_s * 3,
                            start_timeout_s=240,
                            env={"PYTHONPATH": pp, "OMP_NUM_THREADS": "1",
                                 "TORCH_EXTENSIONS_DIR": envs.torch_extensions_dir(self.version),
                                 "SGLANG_LOG_LEVEL": "error", "PYTHONWARNINGS": "ignore",
                                 "TOKENIZERS_PARALLELISM": "false",
                                 **mooncake.worker_env()},
                            preload=None if os.environ.get(NO_ZYGOTE_ENV) else PRELOAD)
            pool.start()
            self._pools[key] = pool
            # SGLang's imports, parallel state and first cache happen in a first job: run an
            # empty Schedule now, so no measured run pays for them (or times out on them)
            from scenarios.core.schedule import Op, Schedule

            warm = Schedule(layout=layout, sut=f"sglang=={self.version}", ops=[Op(kind="step")])
            try:
                pool.run(JOB, self._payload(warm, dp_attention),
                         timeout_s=self.timeout_s * 12 + 120)
            except RankJobError as e:  # the harness could not set SGLang up: say why
                drop_pool(self._pools, key)
                raise SglangSetupFailed(self.version, e) from e
        return pool

    def _payload(self, s: Any, dp: bool) -> dict:
        master, metrics = self.mooncake.address() if s.backend == mooncake.BACKEND else ("", "")
        return {"mooncake_metrics": metrics,"schedule": s.model_dump_json(), "run_id": f"r{uuid.uuid4().hex[:10]}",
                "storage_root": self.storage_root, "collective_timeout_s": self.timeout_s,
                "version": self.version, "dp_attention": dp, "mooncake_master": master,
                "cache_class": self.cache_class}

    def run(self, s: Any, dp_attention: bool | None = None, *, gated: bool = True,
            nemesis: Any = None) -> list[Any]:
        """One run of `s` on every rank. SGLang's runs are always gated (its IO threads wait
        at the harness's seams); faults act through the Schedule, not a nemesis."""
        from scenarios.runner import RankPoolError

        if nemesis is not None:
            raise UsageError("the SGLang SUT takes its faults from the Schedule "
                             "(storage_errors, host_alloc), not from a process nemesis")
        dp = s_dp_attention(s) if dp_attention is None else dp_attention
        if s.backend not in ("memory", "file", mooncake.BACKEND):
            raise CannotJudge(f"backend '{s.backend}' is not wired to the SGLang SUT yet "
                              "(it runs SGLang's file backend or its MooncakeStore)")
        if s.layout_obj.pp > 1:
            raise CannotJudge(f"layout {s.layout}: pipeline parallelism is not driven on the "
                              "SGLang SUT yet (TPxCP layouts only)")
        if s.cache.mla:
            raise CannotJudge("MLA schedules are not driven on the SGLang SUT yet (MHA only)")
        pool = self.pool(s.layout, dp)
        payload = self._payload(s, dp)
        try:
            results = pool.run(JOB, payload, timeout_s=self.timeout_s * 6 + 60)
        except RankPoolError:
            drop_pool(self._pools, s.layout)
            raise
        if any(r.error is not None for r in results):
            drop_pool(self._pools, s.layout)
        return results

    def judge(self, s: Any, results: list[Any]) -> Verdict:
        """The checker's verdict as SGLang's behaviour reads it (see `annotate`)."""
        return verdict_of(s, results, s_dp_attention(s))

    def check(self, s: Any, dp_attention: bool | None = None) -> Verdict:
        dp = s_dp_attention(s) if dp_attention is None else dp_attention
        return verdict_of(s, self.run(s, dp), dp)

    def close(self) -> None:
        close_pools(self._pools)
        self.mooncake.close()  # after the workers: their clients go first
        shutil.rmtree(self.storage_root, ignore_errors=True)


def check_pipeline(version: str) -> None:
    """The seams map two prefetch pipelines: the revoke queue of 0.5.9 .. 0.5.15.post1 and the
    hit queue of 0.5.16 .. 0.5.20 (hitqueue.py). A controller with neither cannot be judged."""
    src = envs.release_dir(version) / "sglang" / "srt" / "managers" / "cache_controller.py"
    try:
        text = src.read_text()
    except OSError:
        return
    if "prefetch_hit_queue" not in text and "prefetch_revoke_queue" not in text:
        raise CannotJudge(f"sglang {version}: its prefetch pipeline (neither a revoke nor a hit "
                          "queue) is not mapped onto cpcheck's seams (driven: 0.5.9 .. 0.5.20)")


def s_dp_attention(s: Any) -> bool:
    return bool(getattr(s, "dp_attention", True))


#: what SGLang does not report that the reference does (stated in every verdict)
NOT_OBSERVED = ("no prefetch-thread decision channel (SGLang's storage hit agreements are "
                "seen as collectives only; from 0.5.19 the per-batch progress agreements are "
                "logged, channel prefetch_sync)", "no store-side copy count (the file backend is "
                "read back through the keys each rank wrote)")


def verdict_of(s: Any, results: list, dp_attention: bool) -> Verdict:
    """The verdict on one SGLang run; `unknown` when the machine broke it (a rank's
    infrastructure error, as `judge.run_checked` reads it), never a divergence of SGLang's
    (and never an agree: annotate would clear an error-free failure list without DP attention)."""
    from scenarios.judge import checker  # looked up per call: tests script the checker
    from scenarios.judge.judging import infrastructure

    broke = infrastructure(results)
    if broke:
        return Verdict.unknown(broke)
    v = annotate(checker.check(s, results), dp_attention, s.backend)
    classes = sorted({c for r in results if (c := (r.snapshot or {}).get("cache_class"))})
    if classes:  # the class the run drove (server_cache.py): in the verdict, --json, replays
        v.stats["cache_class"] = classes[0] if len(classes) == 1 else classes
        if v.message:
            v.message += f" ({'/'.join(classes)})"
    return v


#: key findings that are SGLang's documented behaviour without DP attention: CP peers carry
#: their global TP rank in MHA keys, so they name, share and store pages differently
KEYED_BY_GLOBAL_TP = frozenset({"keys.cp_peers_differ", "keys.cp_peers_share", "keys.copies",
                                "keys.naming"})


def annotate(v: Verdict, dp_attention: bool, backend: str = "file") -> Verdict:
    """Drop the key findings that are SGLang's documented behaviour without DP attention
    (CP peers use their global TP rank in keys) and say what was not observable."""
    notes = list(NOT_OBSERVED if backend != mooncake.BACKEND else mooncake.NOT_OBSERVED)
    if not dp_attention:
        keep = [f for f in v.failures if getattr(f, "rule", None) not in KEYED_BY_GLOBAL_TP]
        if len(keep) != len(v.failures):
            notes.append("without DP attention SGLang keys pages by global TP rank, so CP peers "
                         "write different keys: the key invariant is not applied")
        if not keep:
            v = Verdict(True, stats=v.stats, message=f"{v.stats.get('ranks')} ranks agree on "
                        f"{v.stats.get('decisions')} decisions")
        elif keep != v.failures:
            v = Verdict(False, keep[0][0], keep[0][1], keep, v.stats)
    v.stats["not_observed"] = notes
    return v
