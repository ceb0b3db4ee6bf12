"""The release matrix: each SGLang release x DP attention on/off x layout -> agree / diverge.

Per cell: the corpus replays (every Schedule in scenarios/corpus/, run with that release,
configuration and layout where the file's layout matches), then a generated budget
(`--examples`). A divergence is shrunk, replayed `--replays` times (k/n) and written as a replay
file: divergences in releases after the fix are findings and are kept; one that never recurs is
"flaky", never "agree". Every cell is written to the cells file (`--out`/cells.json) as it
starts and again as it finishes, so a cut run keeps what it measured and `--resume` skips the
finished cells; `python -m scenarios.store.matrix_table FILE...` prints the
table of docs/sglang-release-matrix.md (`--write` puts it there).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scenarios.core.config import CORPUS_DIR, REPO_ROOT
from scenarios.core.contract import ExitCode
from scenarios.core.errors import CannotJudge
from scenarios.core.timeouts import SGLANG_AGREEMENT_S
from scenarios.store import matrix_cells
from scenarios.store.cell import Cell, CorpusFile, CorpusResult, GeneratedResult, Replays
from scenarios.sut.sglang import envs

CORPUS = CORPUS_DIR
_REPO = REPO_ROOT


def corpus_for(layout: str) -> list[Any]:
    from scenarios.store.replay import read_replay

    out = []
    # the reference's variants do not exist in SGLang: their Schedules are just interleavings
    for f in sorted(CORPUS.glob("*.json")) + sorted((CORPUS / "sglang").glob("*.json")):
        s, _ = read_replay(f)
        if s.layout == layout:
            out.append((f.name, s))
    return out


def run_corpus(ex: Any, version: str, dp: bool, layout: str, replays: int,
               replay_dir: str | None = None) -> list[CorpusFile]:
    """Each corpus Schedule of this layout once; a divergence is replayed `replays` times and,
    if it reproduced, written to `replay_dir` with this release and DP setting."""
    from scenarios.judge.judging import confirm, run_checked
    from scenarios.store.replay import write_replay

    rows = []
    for name, s in corpus_for(layout):
        s = s.with_(sut=f"sglang=={version}", dp_attention=dp)
        results, v = run_checked(ex, s)
        if v.status == "unknown" and lacks_seam(results):
            rows.append(CorpusFile(file=name, verdict="cannot",
                                   error=portable(v.diagnosis or "")[:300]))
            continue
        if v.status == "unknown":  # the pool or the machine broke the run: not judged
            rows.append(CorpusFile(file=name, verdict="error",
                                   error=portable(v.diagnosis or "")[:1500]))
            continue
        if v.ok:
            rows.append(CorpusFile(file=name, verdict="agree"))
            continue
        first = v.summary()
        v = confirm(ex, s, v, replays)
        k = (v.stats.get("confirmation") or {}).get("reproduced", 0)
        row = CorpusFile(file=name, verdict="diverge" if k else "flaky", invariant=v.invariant,
                         message=v.message[:300], reproduced=Replays(k=k, n=replays))
        if k == 0:
            row.first_seen = first[:300]
        elif replay_dir:
            row.replay = str(write_replay(s, v, replay_dir, "torchrun"))
        rows.append(row)
    return rows


def lacks_seam(results: list) -> bool:
    """Every rank stopped because the release lacks a seam the Schedule needs (MissingSeam):
    the file cannot run on this release, which says nothing about the machine or the release."""
    from scenarios.core.errors import MissingSeam

    errors = [r.error for r in results if r.error is not None]
    return bool(errors) and all(e.type == MissingSeam.__name__ for e in errors)


def portable(text: str) -> str:
    """A diagnosis as the committed cells file may keep it: no path of this machine (the
    checkout and the Python prefix become relative / `<python>`)."""
    for prefix, name in ((sys.prefix + "/", "<python>/"), (sys.base_prefix + "/", "<python>/"),
                         (str(REPO_ROOT) + "/", "")):
        text = text.replace(prefix, name)
    return text


def _loadavg() -> list[float]:
    try:
        return [round(x, 1) for x in os.getloadavg()]
    except OSError:
        return []


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_cell(ex: Any, version: str, dp: bool, layout: str, examples: int, seed: int,
             replay_dir: str, shrink_s: float | None = 90.0, replays: int = 3) -> Cell:
    from scenarios.campaigns.explore import hunt
    from scenarios.generate.strategies import for_sut
    from scenarios.store.replay import write_replay

    t0 = time.monotonic()
    files = run_corpus(ex, version, dp, layout, replays, replay_dir)
    corpus = CorpusResult(n=len(files), diverge=sum(f.verdict == "diverge" for f in files),
                          flaky=sum(f.verdict == "flaky" for f in files),
                          error=sum(f.verdict == "error" for f in files),
                          cannot=sum(f.verdict == "cannot" for f in files), files=files)
    h = hunt(ex, for_sut(f"sglang=={version}", (layout,), dp_attention=dp), examples, seed,
             shrink_s=shrink_s, replays=replays)
    gen = GeneratedResult(examples=h.examples, seed=seed, budget=examples,
                          infra_errors=[portable(e) for e in h.infra_errors])
    if h.infra_schedules:
        from scenarios.core.verdict import Verdict

        gen.infra_replays = [
            str(write_replay(s, Verdict.unknown(msg[:300]), replay_dir, "torchrun"))
            for s, msg in zip(h.infra_schedules, h.infra_errors, strict=False)]
    if h.found is not None and h.verdict is not None:
        v = h.verdict
        gen = gen.model_copy(update=dict(
            first_s=round(h.seconds_to_first or 0.0, 1), first_n=h.first_n,
            shrink_s=round(h.seconds_shrinking or 0.0, 1), shrunk_ops=h.steps,
            reproduced=Replays(k=h.reproduced, n=h.replays),
            invariant=None if v.ok else v.invariant, message=v.message[:300],
            first_seen=h.first_seen, shrunk_seen=h.best_seen,
            replay=str(write_replay(h.found, v, replay_dir, "torchrun"))))
    return Cell(release=version, dp_attention=dp, layout=layout,
                verdict=cell_verdict(corpus, gen), corpus=corpus, generated=gen,
                cache_class=getattr(ex, "built_class", "") or None,
                seconds=round(time.monotonic() - t0, 1))


def cell_verdict(corpus: CorpusResult, gen: GeneratedResult) -> str:
    """diverge if any divergence reproduced; flaky if divergences were seen and none recurred;
    error if nothing diverged but some runs were not judged; else agree."""
    if (gen.reproduced is not None and gen.reproduced.recurred) or corpus.diverge:
        return "diverge"
    if gen.reproduced is not None or corpus.flaky:
        return "flaky"
    if corpus.error or gen.infra_errors:
        return "error"
    return "agree"


@dataclass(frozen=True)
class MatrixConfig:
    """One matrix run, as the command line asked for it (built in scenarios/cli/)."""

    releases: list[str]
    layouts: list[str]
    dps: list[bool]
    cells_file: Path
    replay_dir: str
    examples: int = 30
    seed: int = 0
    timeout: float = SGLANG_AGREEMENT_S
    shrink_s: float = 90.0
    replays: int = 3
    resume: bool = False
    command: str = "cpcheck matrix"


def default_releases() -> list[str]:
    return envs.releases_in_range()


def run_matrix(cfg: MatrixConfig) -> int:
    from scenarios.sut.sglang.executor import SglangExecutor

    cells_file, replay_dir = cfg.cells_file, cfg.replay_dir
    have = matrix_cells.load(cells_file)  # a bad file is a usage error before any work
    meta = {"command": cfg.command, "commit": _commit(), "examples_budget": cfg.examples,
            "shrink_budget_s": cfg.shrink_s, "host_cpus": os.cpu_count()}
    releases, layouts, dps = cfg.releases, cfg.layouts, cfg.dps
    print(f"cells: {cells_file}", file=sys.stderr)
    for v in releases:
        todo = [(dp, lay) for dp in dps for lay in layouts
                if not (cfg.resume and matrix_cells.finished(
                    have.get(matrix_cells.cell_key(v, dp, lay))))]
        if not todo:
            print(f"sglang {v}: every cell finished already (--resume)", file=sys.stderr)
            continue
        try:
            ex = SglangExecutor(v, timeout_s=cfg.timeout, log=lambda m: print(m, file=sys.stderr))
        except CannotJudge as e:
            for dp, lay in todo:
                matrix_cells.record(cells_file, Cell(
                    release=v, dp_attention=dp, layout=lay, verdict="cannot", why=portable(e.diagnosis),
                    finished_at=_now(), **meta))
            print(f"sglang {v}: cannot run here: {e.diagnosis}", flush=True)
            continue
        with ex:
            for dp, lay in todo:
                start = Cell(release=v, dp_attention=dp, layout=lay, verdict="running",
                             started_at=_now(), loadavg_start=_loadavg(), **meta)
                matrix_cells.record(cells_file, start)
                try:
                    row = run_cell(ex, v, dp, lay, cfg.examples, cfg.seed, replay_dir,
                                   cfg.shrink_s, cfg.replays)
                except (KeyboardInterrupt, SystemExit):
                    raise  # the cell stays "running": --resume redoes it
                except Exception as e:  # one broken cell must not hide the others
                    row = Cell(release=v, dp_attention=dp, layout=lay, verdict="error",
                               error=portable(f"{type(e).__name__}: {str(e)[:300]}"))
                row = start.model_copy(update={
                    **{k: getattr(row, k) for k in row.model_fields_set},
                    "finished_at": _now(), "loadavg_end": _loadavg()})
                matrix_cells.record(cells_file, row)
                from scenarios.store.matrix_table import cell_text

                print(f"sglang {v} dp={'on' if dp else 'off'} {lay}: {cell_text(row)} "
                      f"({row.seconds if row.seconds is not None else '?'} s)", flush=True)
    from scenarios.store.matrix_table import render

    print(render(matrix_cells.load(cells_file)))
    return int(ExitCode.AGREE)
