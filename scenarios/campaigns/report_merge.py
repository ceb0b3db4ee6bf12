"""Merging soak reports: N (the shards of one nightly) folded into one (`cpcheck report merge`).

A nightly spread over N runners (`cpcheck soak --shard I/N`) leaves N output folders. The merge
gives what one long soak would have: one verdict (the worst of the shards: a divergence over an
unknown over agreement), one coverage table (the counts summed), the same plots, and every replay
file the shards kept, copied beside the merged report.json. It judges nothing again: a shard's
verdict was confirmed by replay where it ran.
"""

from __future__ import annotations

import filecmp
import heapq
import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from scenarios.core.errors import CannotJudge, UsageError
from scenarios.judge.coverage import Coverage
from scenarios.store.report import SOAK_REPORT_SCHEMA, atomic_write_text, upgrade_report

#: which status wins when shards disagree (a finding first, then a run that could not judge)
SEVERITY = {"agree": 0, "unknown": 1, "diverge": 2}
#: files a soak keeps beside its report: confirmed divergences and unreproduced ones
KEPT_FILES = ("replay-*.json", "unknown-*.json")


# -- reading -------------------------------------------------------------------------------
def load_report(folder: Path) -> dict:
    """One soak's report.json as a dict (the one place reports are read: swap for
    `SoakReport.load` once the typed model lands). UsageError if it is not one."""
    path = Path(folder) / "report.json"
    if not Path(folder).is_dir():
        raise UsageError(f"{folder}: no such folder")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{folder}: no report.json (not a soak's --out folder)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a soak report ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "runs" not in data or "verdict" not in data:
        raise UsageError(f"{path}: not a soak report (no runs / verdict)")
    schema = data.get("schema")
    if not isinstance(schema, int) or schema < 1:
        raise UsageError(f"{path}: report schema {schema!r} predates merging (needs >= 1)")
    if schema > SOAK_REPORT_SCHEMA:
        raise CannotJudge(f"{path}: report schema {schema} is newer than this commit's "
                          f"({SOAK_REPORT_SCHEMA})")
    return upgrade_report(data)  # an older report's faults counted hits: recount its events


def _status(rep: dict) -> str:
    st = rep.get("status") or (rep.get("verdict") or {}).get("status")
    return st if st in SEVERITY else "unknown"


def check_one_nightly(reps: list[dict], names: list[str]) -> list[str]:
    """The shards must come from one nightly definition; returns the missing shards ("2/3").

    Unsharded reports merge as they are (several soaks of one night on several hosts)."""
    shards = [r.get("shard") for r in reps]
    if not any(shards):
        return []
    if not all(shards):
        plain = names[shards.index(None)]
        raise UsageError(f"{plain}: an unsharded soak among the shards of a nightly")
    first = shards[0]
    seen: dict[int, str] = {}
    for name, sh in zip(names, shards, strict=True):
        if (sh["count"], sh["base_seed"]) != (first["count"], first["base_seed"]):
            raise UsageError(f"{name}: shard {sh['shard']} of base seed {sh['base_seed']}, but "
                             f"{names[0]} is of {first['count']} shards of base seed "
                             f"{first['base_seed']}: not one nightly")
        if sh["index"] in seen:
            raise UsageError(f"{name}: shard {sh['shard']} given twice (also {seen[sh['index']]})")
        seen[sh["index"]] = name
    return [f"{i}/{first['count']}" for i in range(1, first["count"] + 1) if i not in seen]


# -- folding -------------------------------------------------------------------------------
def _common(reps: list[dict], key: str) -> Any:
    """The shards' shared value of `key`, or their distinct values joined by commas."""
    vals = list(dict.fromkeys(str(r.get(key)) for r in reps))
    if len(vals) == 1:
        return reps[0].get(key)
    return ",".join(vals)


def merge_timelines(reps: list[dict]) -> list[dict]:
    """All shards' timeline points on one clock (seconds since each shard started; the matrix
    starts them together): cumulative runs and decisions summed over the shards at each point.

    Each shard's timeline is already in time order, so a k-way merge does (no global sort)."""
    streams = [[(p["t"], i, p) for p in r.get("timeline") or ()] for i, r in enumerate(reps)]
    last_runs = [0] * len(reps)
    last_dec = [0] * len(reps)
    runs = dec = 0
    out = []
    for t, i, p in heapq.merge(*streams, key=lambda x: (x[0], x[1])):
        runs += p["runs"] - last_runs[i]
        dec += p["decisions"] - last_dec[i]
        last_runs[i], last_dec[i] = p["runs"], p["decisions"]
        out.append({"t": t, "runs": runs, "decisions": dec,
                    "decisions_per_s": round(dec / t, 1) if t else 0.0,
                    "run_decisions_per_s": p.get("run_decisions_per_s", 0.0),
                    "faults_in_run": p.get("faults_in_run", 0), "shard": i + 1})
    return out


def merge_coverage(reps: list[dict]) -> Coverage:
    cov = Coverage()
    for r in reps:
        cov.runs += int(r.get("runs", 0))
        for point, counts in (r.get("coverage") or {}).items():
            if point == "prefetch_shares" or not isinstance(counts, dict):
                continue  # a share is recomputed from the summed counts, never summed
            cov.counts[point].update({k: int(v) for k, v in counts.items()})
    return cov


def merge_fault_runs(reps: list[dict]) -> dict:
    """Runs each fault kind met, summed over the reports; shares of the merged runs (a report
    of schema 3 said `faultable_runs`: its other runs were gated chunks)."""
    runs = gated = 0
    by_kind: dict[str, dict[str, int]] = {}
    for r in reps:
        fr = r.get("fault_runs") or {}
        if not fr:
            continue
        runs += int(fr.get("runs", 0))
        gated += int(fr.get("gated_runs", fr.get("runs", 0) - fr.get("faultable_runs", 0)))
        for k, v in (fr.get("by_kind") or {}).items():
            acc = by_kind.setdefault(k, {"runs": 0, "gated_runs": 0})
            acc["runs"] += int(v.get("runs", 0))
            acc["gated_runs"] += int(v.get("gated_runs", 0))
    if not by_kind:
        return {}
    return {"runs": runs, "gated_runs": gated,
            "by_kind": {k: {"runs": v["runs"], "share": round(v["runs"] / runs, 3) if runs else 0.0,
                            "gated_runs": v["gated_runs"]} for k, v in sorted(by_kind.items())}}


def _tagged(items: list, tag: str, paths: dict[str, str] | None = None) -> list:
    out = []
    for it in items:
        it = {**it, "shard": tag} if isinstance(it, dict) else {"value": it, "shard": tag}
        if paths is not None and it.get("file"):
            it["file"] = paths.get(Path(it["file"]).name, it["file"])
        out.append(it)
    return out


def merge(reps: list[dict], names: list[str], kept: dict[str, str],
          missing: list[str]) -> tuple[dict, Coverage]:
    """The merged report (what `cpcheck soak` writes, plus `merged_from`) and its coverage.

    `kept` maps a replay file's name in a shard to its path beside the merged report."""
    tags = [(r.get("shard") or {}).get("shard") or n for r, n in zip(reps, names, strict=True)]
    statuses = [_status(r) for r in reps]
    worst = max(range(len(reps)), key=lambda i: (SEVERITY[statuses[i]], -i))
    interrupted = any(r.get("interrupted") for r in reps)
    faults: Counter = Counter()
    asked: set[str] = set()
    outcomes: Counter = Counter()
    for r in reps:
        faults.update({k: int(v) for k, v in (r.get("faults") or {}).items()})
        asked.update(r.get("faults") or {})
        outcomes.update({k: int(v) for k, v in (r.get("prefetch_outcomes") or {}).items()})
    runs = sum(int(r.get("runs", 0)) for r in reps)
    decisions = sum(int(r.get("decisions", 0)) for r in reps)
    seconds = max(float(r.get("seconds") or 0.0) for r in reps)  # the shards ran side by side
    if statuses[worst] == "agree":
        verdict = {"ok": True, "status": "agree", "invariant": None,
                   "message": f"all {len(reps)} reports agree", "diagnosis": None,
                   "failures": [], "stats": {}}
        if missing:
            diag = (f"shard(s) {', '.join(missing)} of the nightly have no report here: "
                    f"the nightly did not run all its parts")
            verdict = {**verdict, "ok": False, "status": "unknown", "message": diag,
                       "diagnosis": diag}
    else:
        verdict = {**reps[worst]["verdict"], "status": statuses[worst]}
        verdict["message"] = f"{tags[worst]}: {verdict.get('message')}"
        if verdict.get("diagnosis"):
            verdict["diagnosis"] = f"{tags[worst]}: {verdict['diagnosis']}"
    replay = reps[worst].get("replay") if statuses[worst] != "agree" else None
    if replay:
        replay = kept.get(Path(replay).name, replay)
    coverage = merge_coverage(reps)
    unknown_runs = [u for r, t in zip(reps, tags, strict=True)
                    for u in _tagged(r.get("unknown_runs") or [], t)]
    merged = {
        "layout": _common(reps, "layout"), "variant": _common(reps, "variant"),
        "backend": _common(reps, "backend"), "mode": _common(reps, "mode"),
        "protocol": _common(reps, "protocol"), "dp_attention": _common(reps, "dp_attention"),
        "seed": _common(reps, "seed"), "minutes": max(float(r.get("minutes") or 0) for r in reps),
        "runs": runs, "decisions": decisions, "seconds": round(seconds, 2),
        "runner_seconds": round(sum(float(r.get("seconds") or 0.0) for r in reps), 2),
        "decisions_per_s": round(decisions / seconds, 1) if seconds else 0.0,
        "runs_per_s": round(runs / seconds, 2) if seconds else 0.0,
        "faults": dict(sorted(faults.items())), "fault_runs": merge_fault_runs(reps),
        "faults_never_fired": sorted(k for k in asked if faults.get(k, 0) == 0),
        "status": verdict["status"], "verdict": verdict,
        "seconds_to_divergence": reps[worst].get("seconds_to_divergence")
        if statuses[worst] == "diverge" else None,
        "confirmed_by_replay": reps[worst].get("confirmed_by_replay")
        if statuses[worst] != "agree" else None,
        "interrupted": interrupted, "unknown_runs": unknown_runs,
        "lost_runs": sum(int(r.get("lost_runs") or 0) for r in reps),
        "unconfirmed_divergences": [u for r, t in zip(reps, tags, strict=True)
                                    for u in _tagged(r.get("unconfirmed_divergences") or [], t,
                                                     kept)],
        "unknown_diagnoses": [u["diagnosis"] for u in unknown_runs[:20] if "diagnosis" in u],
        "fault_events": [e for r, t in zip(reps, tags, strict=True)
                         for e in _tagged(r.get("fault_events") or [], t)],
        "replay": replay, "prefetch_outcomes": dict(outcomes), "coverage": coverage.to_dict(),
        "timeline": merge_timelines(reps),
        "host_used": [h for r in reps for h in r.get("host_used") or ()],
        "shard": None, "missing_shards": missing, "kept_files": sorted(kept.values()),
        "merged_from": [{"dir": n, "shard": t, "seed": r.get("seed"), "layout": r.get("layout"),
                         "status": s, "runs": r.get("runs"), "seconds": r.get("seconds"),
                         "mode": r.get("mode"),
                         "interrupted": bool(r.get("interrupted"))}
                        for n, t, r, s in zip(names, tags, reps, statuses, strict=True)],
    }
    return merged, coverage


def keep_files(dirs: list[Path], out: Path) -> dict[str, str]:
    """Copy every replay / unknown file of every shard into `out`; {name in shard: new path}.

    Two shards' files of one name (the same schedule found twice) stay one file when equal;
    otherwise the later one is kept as `shardK-NAME`."""
    kept: dict[str, str] = {}
    for k, d in enumerate(dirs, 1):
        for pattern in KEPT_FILES:
            for src in sorted(d.glob(pattern)):
                dst = out / src.name
                if dst.exists() and not filecmp.cmp(src, dst, shallow=False):
                    dst = out / f"shard{k}-{src.name}"
                if not dst.exists():
                    shutil.copyfile(src, dst)
                kept.setdefault(src.name, str(dst))
    return kept


# -- the command ---------------------------------------------------------------------------
def soak_dir(folder: Path) -> Path:
    """The run dir of one soak under `folder`: the folder itself when it holds report.json,
    else its `latest` link, else its one `TIMESTAMP-seedN` run dir (what a shard's uploaded
    --out holds: an artifact keeps no links). UsageError when that is not one dir."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "report.json").exists():
        return folder
    if (folder / "latest" / "report.json").exists():
        return (folder / "latest").resolve()
    runs = sorted(p.parent for p in folder.glob("*-seed*/report.json"))
    if len(runs) > 1:
        raise UsageError(f"{folder}: {len(runs)} soaks' run dirs; name the one to merge")
    return runs[0] if runs else folder


def check_inputs(dirs: list[str], out: Path) -> list[Path]:
    """Usage errors before any work: a folder twice, or the output among the inputs."""
    paths = [soak_dir(Path(d)) for d in dirs]
    resolved = [p.resolve() for p in paths]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise UsageError(f"{dirs[i]}: given twice")
    if out.resolve() in resolved:
        raise UsageError(f"--out {out}: is one of the reports being merged")
    return paths


def write_merged(out: Path, merged: dict, coverage: Coverage) -> None:
    """report.json first (everything, compact: the C encoder is ~10x faster than an indented
    dump at this size), then the soak's plots drawn from the merged data, thinned."""
    from scenarios.nemesis.faults import KINDS
    from scenarios.store.plots_thinned import plot_faults, plot_host_pool, thin_timeline
    from scenarios.store.report import _finite, write_plots

    data = {"schema": SOAK_REPORT_SCHEMA, **merged}
    try:
        text = json.dumps(data, allow_nan=False, default=str)
    except ValueError:  # a NaN / inf somewhere: null, as the soak writes it
        text = json.dumps(_finite(data), default=str)
    atomic_write_text(out / "report.json", text)
    try:
        write_plots(out, thin_timeline(merged["timeline"]), Counter(merged["prefetch_outcomes"]),
                    [])
        plot_host_pool(out / "host_pool.png", merged["host_used"])
        coverage.plot(out / "coverage.png")
        if merged["faults"]:
            plot_faults(out / "faults.png", merged["fault_events"], merged["seconds"], KINDS,
                        merged["faults"], merged=True)
    except Exception as e:  # plots are a view of report.json, never worth a verdict
        print(f"cpcheck: warning: plots not written: {type(e).__name__}: {e}", file=sys.stderr)
