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
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from scenarios.core import suts
from scenarios.core.config import REPO_ROOT
from scenarios.core.errors import CannotJudge, RankJobError, SglangSetupFailed, UsageError
from scenarios.core.timeouts import SGLANG_AGREEMENT_S, Timeouts
from scenarios.core.verdict import Verdict
from scenarios.runner.pools import close_pools, drop_pool
from scenarios.sut.sglang import consensus, envs, mooncake
from scenarios.sut.sglang.tree import SglangTree, open_tree, worker_path

JOB = "scenarios.sut.sglang.rank:run_schedule"
CACHE_CLASS_ENV = "CPCHECK_SGLANG_CACHE_CLASS"
#: SGLang imported once per pool, in a zygote that forks the ranks (scenarios/runner/zygote.py)
PRELOAD = "scenarios.sut.sglang.rank:preload"
#: set (to anything): every rank imports SGLang itself, as before the zygote (for comparison)
NO_ZYGOTE_ENV = "CPCHECK_SGLANG_NO_ZYGOTE"
_REPO = REPO_ROOT


def parse_sut(sut: str) -> str | None:
    """'reference' -> None; 'sglang==V' -> 'V' (a release number this code can parse)."""
    if suts.sglang_tree(sut) is not None:
        return None
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

    def __init__(self, version: str = "", *, timeout_s: float = SGLANG_AGREEMENT_S, build: bool = True,
                 log: Any = print, mooncake_master: str = "", cache_class: str = "",
                 tree: str | None = None, consensus_checker: bool = False) -> None:
        #: a source tree (--sut sglang@PATH) runs on the closest built release's environment
        self.tree: SglangTree | None = open_tree(tree, build=build, log=log) if tree else None
        if self.tree is not None:
            version = self.tree.env
        envs.check_runnable(version)
        self.version = version
        self.sut = suts.SGLANG_TREE_PREFIX + tree if tree else suts.sglang(version)
        #: "server": the cache the release's server builds (server_cache.py); "HiRadixCache":
        #: that class, where the release still defines it but its server no longer builds it
        #: (the environment variable CPCHECK_SGLANG_CACHE_CLASS sets it for the command line)
        self.cache_class = cache_class or os.environ.get(CACHE_CLASS_ENV) or "server"
        #: the class the ranks actually built, as the warm-up run's snapshots name it ("" until
        #: a pool has started): the matrix records it per cell
        self.built_class = ""
        self.timeout_s = timeout_s
        #: SGLang's own rank-consensus checker on in the workers (consensus.py), per run
        #: (SGLANG_ENABLE_RANK_CONSENSUS_CHECKER=1 in cpcheck's environment turns it on too)
        self.consensus_checker = consensus_checker or consensus.enabled()
        if build:
            envs.build_release(version, log=log)
        elif envs.load_manifest(version) is None or not envs.load_manifest(version).ok:
            raise CannotJudge(f"no built environment for sglang {version}: run "
                              f"python -m scenarios.sut.sglang.envs {version}")
        check_pipeline(version, self.tree)
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
            for lock in envs.clear_stale_compile_locks(self.version):  # stderr: not --json's
                print(f"cpcheck: removed a compile lock a killed process left: {lock}",
                      file=sys.stderr)
            pp = os.pathsep.join([str(_REPO), *worker_path(self.tree, self.version)]
                                 + ([os.environ["PYTHONPATH"]]
                                    if os.environ.get("PYTHONPATH") else []))
            pool = RankPool(layout, device="cpu",
                            collective_timeout_s=Timeouts(self.timeout_s).collective_s,
                            start_timeout_s=240,
                            env={"PYTHONPATH": pp, "OMP_NUM_THREADS": "1",
                                 "TORCH_EXTENSIONS_DIR": envs.torch_extensions_dir(self.version),
                                 "SGLANG_LOG_LEVEL": "error", "PYTHONWARNINGS": "ignore",
                                 "TOKENIZERS_PARALLELISM": "false",
                                 **({consensus.ENV: "1"} if self.consensus_checker else {}),
                                 **mooncake.worker_env()},
                            preload=None if os.environ.get(NO_ZYGOTE_ENV) else PRELOAD)
            pool.start()
            self._pools[key] = pool
            # SGLang's imports, parallel state and first cache happen in a first job: run an
            # empty Schedule now, so no measured run pays for them (or times out on them)
            from scenarios.core.schedule import Op, Schedule

            warm = Schedule(layout=layout, sut=self.sut, ops=[Op(kind="step")])
            try:
                warmed = pool.run(JOB, self._payload(warm, dp_attention),
                                  timeout_s=Timeouts(self.timeout_s).sglang_setup_s)
            except RankJobError as e:  # the harness could not set SGLang up: say why
                drop_pool(self._pools, key)
                raise SglangSetupFailed(self.tree.label() if self.tree else self.version,
                                        e) from e
            self.built_class = built_class(warmed) or self.built_class
        return pool

    def _payload(self, s: Any, dp: bool) -> dict:
        master, metrics = self.mooncake.address() if s.backend == mooncake.BACKEND else ("", "")
        return {"mooncake_metrics": metrics,"schedule": s.model_dump_json(), "run_id": f"r{uuid.uuid4().hex[:10]}",
                "storage_root": self.storage_root, "collective_timeout_s": self.timeout_s,
                "version": self.version, "sut": self.sut, "dp_attention": dp, "mooncake_master": master,
                "cache_class": self.cache_class, "consensus_checker": self.consensus_checker}

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
        pool = self.pool(s.layout, dp)
        payload = self._payload(s, dp)
        try:
            results = pool.run(JOB, payload, timeout_s=Timeouts(self.timeout_s).run_s)
        except RankPoolError as e:
            drop_pool(self._pools, s.layout)
            mismatch = died_in_mismatch(os.path.join(self.storage_root, payload["run_id"]), e)
            if mismatch is not None:
                raise mismatch from e
            raise
        said = consensus.compare(results) if self.consensus_checker else None
        if any(r.error is not None for r in results) or (said and said["stuck_ranks"]):
            drop_pool(self._pools, s.layout)  # a checker thread stuck in its all-reduce too
        return results

    def judge(self, s: Any, results: list[Any]) -> Verdict:
        """The checker's verdict as SGLang's behaviour reads it (see `annotate`)."""
        return self._provenance(verdict_of(s, results, s_dp_attention(s)), results)

    def check(self, s: Any, dp_attention: bool | None = None) -> Verdict:
        dp = s_dp_attention(s) if dp_attention is None else dp_attention
        results = self.run(s, dp)
        return self._provenance(verdict_of(s, results, dp), results)

    def _provenance(self, v: Verdict, results: list[Any]) -> Verdict:
        """A source tree's path, git commit, dirtiness and borrowed environment, in the
        verdict (so in --json and replay files); `unknown` if a rank imported `sglang` from
        anywhere else (the verdict would be on the wrong code)."""
        said = consensus.compare(results) if getattr(self, "consensus_checker", False) else None
        if said is not None:
            v.stats["consensus_checker"] = said
        if getattr(self, "tree", None) is None:
            return v
        root = self.tree.path.rstrip(os.sep) + os.sep
        wrong = sorted({p for r in results if (p := r.sglang_package)
                        and not p.startswith(root)})
        if wrong:
            return Verdict.unknown(f"{self.tree.label()}: the workers imported sglang from "
                                   f"{', '.join(wrong)}, not from the tree")
        v.stats["sglang_tree"] = self.tree.to_dict()
        return v

    def close(self) -> None:
        close_pools(self._pools)
        self.mooncake.close()  # after the workers: their clients go first
        shutil.rmtree(self.storage_root, ignore_errors=True)


def check_pipeline(version: str, tree: SglangTree | None = None) -> None:
    """The seams map two prefetch pipelines: the revoke queue of 0.5.9 .. 0.5.15.post1 and the
    hit queue of 0.5.16 .. 0.5.20 (hitqueue.py). A controller with neither cannot be judged."""
    top = envs.release_dir(version) if tree is None else tree.path
    src = Path(top) / "sglang" / "srt" / "managers" / "cache_controller.py"
    try:
        text = src.read_text()
    except OSError:
        return
    if "prefetch_hit_queue" not in text and "prefetch_revoke_queue" not in text:
        what = f"sglang {tree.label() if tree else version}"
        raise CannotJudge(f"{what}: its prefetch pipeline (neither a revoke nor a hit "
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
    v = annotate(checker.check(s, results), dp_attention, s.backend, mla=s.cache.mla)
    classes = _classes(results)
    if classes:  # the class the run drove (server_cache.py): in the verdict, --json, replays
        v.stats["cache_class"] = classes[0] if len(classes) == 1 else classes
        if v.message:
            v.message += f" ({'/'.join(classes)})"
    return v


def _classes(results: list[Any]) -> list[str]:
    return sorted({r.snapshot.cache_class for r in results
                   if r.snapshot is not None and r.snapshot.cache_class})


def built_class(results: list[Any]) -> str:
    """The cache class every rank of a run built ("A/B" if ranks differ, "" if none said)."""
    return "/".join(_classes(results))


#: key findings that are SGLang's documented behaviour without DP attention: CP peers carry
#: their global TP rank in MHA keys, so they name, share and store pages differently
KEYED_BY_GLOBAL_TP = frozenset({"keys.cp_peers_differ", "keys.cp_peers_share", "keys.copies",
                                "keys.naming"})


def annotate(v: Verdict, dp_attention: bool, backend: str = "file", *,
             mla: bool = False) -> Verdict:
    """Drop the key findings that are SGLang's documented behaviour without DP attention
    (CP peers use their global TP rank in MHA keys) and say what was not observable. MLA keys
    carry no TP rank, so for MLA every key finding stands."""
    notes = list(NOT_OBSERVED if backend != mooncake.BACKEND else mooncake.NOT_OBSERVED)
    if not dp_attention and not mla:
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


def died_in_mismatch(run_dir: str, e: Exception) -> Any:
    """A rank that died (gloo aborts on mismatched collective sizes) while the ranks' call
    logs part on one group: the release's divergence (call_log.py), else None."""
    from scenarios.core.errors import CollectiveMismatchDied, RankDiedError
    from scenarios.sut.sglang.call_log import first_mismatch

    if not isinstance(e, RankDiedError):
        return None
    where = first_mismatch(run_dir)
    if where is None:
        return None
    return CollectiveMismatchDied(where, (str(e).splitlines() or [""])[0])
