"""SGLang's own rank-consensus checker beside cpcheck's, per finding: did it fire, what did it
say, and how long (decisions / seconds) after the first divergent decision.

    python -m benchmarks.consensus_checker [--release 0.5.20 ...] [--plant 0.5.20]
        [--examples 8] [--seed 0] [--skip-corpus] [--out docs/measurements/consensus-checker.md]

Rows:
- every SGLang corpus file (scenarios/corpus/sglang/*.json, scenarios/corpus/replay-sglang-*),
  on each release it names and each --release, with the checker on
  (SGLANG_ENABLE_RANK_CONSENSUS_CHECKER=1 in the workers); a release without the checker's
  module is said so without running;
- a generated budget (`explore`'s hunt, --examples Schedules and its shrinking) on each --release
  and on each planted tree: every judged run is tallied (cpcheck diverged / the checker fired);
- `--plant V`: release V's sources with PR #20460 reverted in the cache's agreement (the
  attention-CP group dropped from `_all_reduce_attn_groups`, so CP peers no longer agree), run as
  `--sut sglang@TREE`: findings where the bug class is known to be present.

Needs the release environments (python -m scenarios.sut.sglang.envs 0.5.20 ...). Slow: every
run is a real SGLang cache on two or four ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scenarios.core.config import REPO_ROOT
from scenarios.core.errors import CannotJudge, UsageError
from scenarios.store.doc_tables import write_block

CORPUS = sorted((REPO_ROOT / "scenarios" / "corpus" / "sglang").glob("*.json")) + \
    sorted((REPO_ROOT / "scenarios" / "corpus").glob("replay-sglang-*.json"))
CHECKER = Path("sglang") / "srt" / "utils" / "rank_consensus_checker.py"
PLANT_FILE = Path("sglang") / "srt" / "mem_cache" / "unified_radix_cache.py"
PLANT_FROM = "        for group in (self.attn_cp_group, self.attn_tp_group):\n" \
             "            if group is not None and torch.distributed.get_world_size(" \
             "group=group) > 1:\n                torch.distributed.all_reduce("
PLANT_TO = "        for group in (self.attn_tp_group,):  # cpcheck plant: PR #20460 reverted\n" \
           "            if group is not None and torch.distributed.get_world_size(" \
           "group=group) > 1:\n                torch.distributed.all_reduce("


def has_checker(release: str) -> bool:
    from scenarios.sut.sglang import envs

    return (envs.release_dir(release) / CHECKER).is_file()


def plant(release: str, where: Path) -> Path:
    """`release`'s sglang package with #20460 reverted in the cache's agreement: the tree."""
    from scenarios.sut.sglang import envs

    root = where / f"sglang-{release}-no-cp-sync" / "python"
    shutil.copytree(envs.release_dir(release) / "sglang", root / "sglang",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "pyproject.toml").write_text(f'[project]\nname = "sglang"\nversion = "{release}"\n')
    f = root / PLANT_FILE
    text = f.read_text()
    if text.count(PLANT_FROM) != 1:
        raise CannotJudge(f"sglang {release}: _all_reduce_attn_groups is not where the plant "
                          "expects it")
    f.write_text(text.replace(PLANT_FROM, PLANT_TO))
    return root


def _executor(sut: str) -> Any:
    from scenarios.core.suts import sglang_tree
    from scenarios.sut.sglang.executor import SglangExecutor

    tree = sglang_tree(sut)
    return SglangExecutor("" if tree else sut.split("==")[1], tree=tree, build=False,
                          consensus_checker=True, timeout_s=30)


def _said(v: Any) -> tuple[str, str, str]:
    """(fired?, when, what it said) of one verdict's checker summary."""
    c = v.stats.get("consensus_checker")
    if c is None:
        return "not run", "", ""
    if not c["configured"]:
        return "absent", "", ""
    if not c["fired_ranks"]:
        stuck = f" (blocked at the end on ranks {c['stuck_ranks']})" if c["stuck_ranks"] else ""
        ev = c["events"].values()
        return f"no ({min(ev)}-{max(ev)} events/rank){stuck}", "", ""
    when = "" if c["after_decisions"] is None else \
        f"{c['after_decisions']} decisions / {c['after_s']:.2f} s after #{c['first_divergent_decision']}"
    return f"yes, ranks {c['fired_ranks']}", when, c["message"][:220]


def _verdict(v: Any) -> str:
    if v.status == "diverge":
        return f"diverge [{v.invariant}]"
    return v.status if v.status != "unknown" else f"unknown: {(v.diagnosis or '')[:80]}"


def _row(file: str, sut: str, cpcheck: str, fired: str = "", when: str = "",
         said: str = "") -> dict:
    return {"file": file, "sut": sut, "cpcheck": cpcheck, "fired": fired, "when": when,
            "said": said}


def corpus_rows(targets: list[str], log: Any, rows: list[dict]) -> list[dict]:
    held: dict[str, Any] = {}
    try:
        _corpus(targets, log, rows, held)
    finally:
        for ex in held.values():
            ex.close()
    return rows


def _corpus(targets: list[str], log: Any, rows: list[dict], held: dict) -> None:
    from scenarios.judge.judging import run_checked
    from scenarios.runner import max_ranks_here
    from scenarios.store.replay import read_replay
    from scenarios.sut.sglang import envs

    for path in CORPUS:
        s, data = read_replay(path)
        named = list((data.get("expect_by_release") or {}).keys())
        if s.sut.startswith("sglang==") and s.sut not in named:
            named.insert(0, s.sut)
        for sut in dict.fromkeys(named + targets):
            rel = sut.split("==")[1] if sut.startswith("sglang==") else None
            label = path.name
            if rel is not None:
                m = envs.load_manifest(rel)
                if m is None or not m.ok:
                    rows.append(_row(label, sut, "not run (env not built here)"))
                    continue
                if not has_checker(rel):
                    rows.append(_row(label, sut, "not run", "absent in this release"))
                    continue
            if s.layout_obj.pp > 1 or s.layout_obj.world_size > max_ranks_here():
                rows.append(_row(label, _short(sut), f"cannot run here (layout {s.layout})"))
                continue
            t = time.monotonic()
            try:
                if sut not in held:  # one executor per SUT: its pools serve every file
                    held[sut] = _executor(sut)
                _, v = run_checked(held[sut], s.with_(sut=sut))
            except (CannotJudge, UsageError) as e:
                rows.append(_row(label, sut, f"cannot run here: {str(e)[:80]}"))
                continue
            fired, when, msg = _said(v)
            rows.append(_row(label, _short(sut), _verdict(v), fired, when, msg))
            log(f"{path.name} on {sut}: {_verdict(v)}; checker {fired} {when} "
                f"({time.monotonic() - t:.0f} s)")


def _short(sut: str) -> str:
    return sut if not sut.startswith("sglang@") else "sglang@" + Path(sut[7:]).parent.name


class Tally:
    """The executor, with every judged run's cpcheck verdict and checker summary kept."""

    def __init__(self, ex: Any) -> None:
        self.ex, self.runs = ex, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ex, name)

    def judge(self, s: Any, results: list) -> Any:
        v = self.ex.judge(s, results)
        self.runs.append(v)
        return v


def generated_rows(targets: list[str], examples: int, seed: int, log: Any,
                   rows: list[dict]) -> list[dict]:
    from scenarios.campaigns.explore import hunt
    from scenarios.generate.strategies import for_sut

    for sut in targets:
        t = time.monotonic()
        with _executor(sut) as ex:
            tally = Tally(ex)
            h = hunt(tally, for_sut(sut, ("1x2",)), examples, seed, shrink_s=120)
        judged = [v for v in tally.runs if v.status in ("agree", "diverge")]
        fired = [v for v in judged if (v.stats.get("consensus_checker") or {}).get("fired_ranks")]
        div = [v for v in judged if v.status == "diverge"]
        both = [v for v in div if any(v is f for f in fired)]
        found = "none" if h.verdict is None else _verdict(h.verdict)
        f_fired, f_when, f_msg = _said(h.verdict) if h.verdict is not None else ("", "", "")
        rows.append({"sut": _short(sut), "runs": len(judged),
                     "not_judged": len(tally.runs) - len(judged), "diverged": len(div),
                     "fired": len(fired), "both": len(both), "finding": found,
                     "on_finding": f"{f_fired} {f_when}".strip(), "said": f_msg})
        log(f"generated on {sut}: {len(judged)} runs, {len(div)} diverge, {len(fired)} fired "
            f"({time.monotonic() - t:.0f} s)")
    return rows


TABLE = "consensus-checker"
COMMAND = "python -m benchmarks.consensus_checker"


def _cells(*values: object) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"


def render(data: dict) -> str:
    """The doc's table from the raw rows (docs/measurements/consensus-checker.json)."""
    m = data["meta"]
    body = [("" if m.get("complete", True) else "**Incomplete** (the run was stopped; the rows "
             "below are what it measured). ") + f"Measured {m['date']} in {m['seconds']} s (load average {m['load']} on {m['cores']} "
            f"cores; seconds are wall-clock on that box) by `{m['command']}`. "
            "`sglang@...-no-cp-sync`: the release with PR #20460 reverted in "
            "`_all_reduce_attn_groups` (`--plant`).", ""]
    if data["corpus"]:
        body += ["| finding (corpus file) | SUT | cpcheck | SGLang's checker fired | after the "
                 "first divergent decision | what it said |", "|---|---|---|---|---|---|"]
        body += [_cells(f"`{r['file']}`", r["sut"], r["cpcheck"], r["fired"], r["when"],
                        r["said"]) for r in data["corpus"]]
        body.append("")
    if data["generated"]:
        body += [f"Generated budget: `explore` on 1x2, {m['examples']} Schedules (seed "
                 f"{m['seed']}) plus shrinking; every judged run counted.", "",
                 "| SUT | runs judged (not judged) | cpcheck diverged | checker fired | both | "
                 "finding | checker on the finding | what it said |",
                 "|---|---|---|---|---|---|---|---|"]
        body += [_cells(r["sut"], f"{r['runs']} ({r['not_judged']})", r["diverged"],
                        r["fired"], r["both"], r["finding"], r["on_finding"], r["said"])
                 for r in data["generated"]]
    return "\n".join(body).rstrip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.consensus_checker")
    ap.add_argument("--release", action="append", default=None,
                    help="release(s) with the checker to run every finding on (default 0.5.20)")
    ap.add_argument("--plant", action="append", default=[],
                    help="also a tree of this release with #20460 reverted (repeatable)")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-corpus", action="store_true")
    ap.add_argument("--from-json", default=None,
                    help="only re-render the table from this raw file (no runs)")
    ap.add_argument("--out", default=str(REPO_ROOT / "docs" / "measurements" /
                                         "consensus-checker.md"))
    args = ap.parse_args(argv)
    if args.from_json:
        write_block(args.out, TABLE, render(json.loads(Path(args.from_json).read_text())),
                    COMMAND, title="SGLang's rank-consensus checker beside cpcheck")
        print(f"wrote {args.out}")
        return 0
    releases = [f"sglang=={v}" for v in (args.release or ["0.5.20"])]
    t0 = time.monotonic()
    data: dict[str, Any] = {
        "meta": {"date": time.strftime("%Y-%m-%d"), "seconds": 0, "load": 0,
                 "cores": os.cpu_count(), "examples": args.examples, "seed": args.seed,
                 "complete": False,
                 "command": " ".join(["python -m benchmarks.consensus_checker",
                                      *(argv if argv is not None else sys.argv[1:])])},
        "corpus": [], "generated": []}

    def save(line: str = "") -> None:  # after every row: a stopped run keeps what it measured
        if line:
            print(line, flush=True)
        data["meta"].update(seconds=round(time.monotonic() - t0),
                            load=round(os.getloadavg()[0]))
        Path(args.out).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        write_block(args.out, TABLE, render(data), COMMAND,
                    title="SGLang's rank-consensus checker beside cpcheck")

    with tempfile.TemporaryDirectory(prefix="cpcheck-plant-") as tmp:
        trees = [f"sglang@{plant(v, Path(tmp))}" for v in args.plant]
        targets = releases + trees
        if args.examples:  # the generated budget first: the planted trees' findings
            generated_rows(targets, args.examples, args.seed, save, data["generated"])
        if not args.skip_corpus:
            corpus_rows(targets, save, data["corpus"])
    data["meta"]["complete"] = True
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
