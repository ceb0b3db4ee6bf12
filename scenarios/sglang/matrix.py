"""The release matrix: each SGLang release x DP attention on/off x layout -> agree / diverge.

Per cell: the corpus replays (every Schedule in scenarios/corpus/, run with that release,
configuration and layout where the file's layout matches), then a generated budget
(`--examples`). A divergence is shrunk and written as a replay file: divergences in releases
after the fix are findings and are kept. Cells that did not run say so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from scenarios.contract import CannotJudge, ExitCode
from scenarios.sglang import envs

CORPUS = Path(__file__).resolve().parents[1] / "corpus"


def add_matrix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", action="append", help="repeatable (default: 0.5.9 .. 0.5.20)")
    p.add_argument("--layout", action="append", help="repeatable (default: 1x2 2x2)")
    p.add_argument("--dp-attention", choices=["on", "off", "both"], default="both")
    p.add_argument("--examples", type=int, default=30, help="generated schedules per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--shrink-s", type=float, default=90.0, help="shrinking budget per cell")
    p.add_argument("--replay-dir", default="cpcheck-out/matrix")
    p.add_argument("--json", default="", help="also write the table as JSON here")


def corpus_for(layout: str) -> list[Any]:
    from scenarios.replay import read_replay

    out = []
    # the reference's variants do not exist in SGLang: their Schedules are just interleavings
    for f in sorted(CORPUS.glob("*.json")) + sorted((CORPUS / "sglang").glob("*.json")):
        s, _ = read_replay(f)
        if s.layout == layout and not s.cache.mla:
            out.append((f.name, s))
    return out


def run_cell(ex: Any, version: str, dp: bool, layout: str, examples: int, seed: int,
             replay_dir: str, shrink_s: float | None = 90.0) -> dict:
    from scenarios.sglang.hunting import hunt, write_sglang_replay

    t0 = time.monotonic()
    row: dict = {"release": version, "dp_attention": dp, "layout": layout}
    sut = f"sglang=={version}"
    corpus_div = []
    for name, s in corpus_for(layout):
        s = s.with_(sut=sut, dp_attention=dp)
        v = ex.check(s, dp)
        if not v.ok:
            corpus_div.append(name)
    n = len(corpus_for(layout))
    row["corpus"] = f"{len(corpus_div)}/{n} diverge" if corpus_div else f"{n}/{n} agree"
    h = hunt(version, dp, (layout,), examples, seed, ex=ex, shrink_s=shrink_s)
    row["examples"] = h["examples"]
    if h["found"] is not None and h.get("flaky"):
        row["verdict"] = "flaky (diverged once, agreed on rerun)"
        row["replay"] = str(write_sglang_replay(h["found"], h["verdict"], replay_dir))
    elif h["found"] is not None:
        row["verdict"] = "diverge"
        row["first_s"] = round(h["first_s"], 1)
        row["shrunk_ops"] = len(h["found"].ops)
        row["invariant"] = h["verdict"].invariant
        row["replay"] = str(write_sglang_replay(h["found"], h["verdict"], replay_dir))
    else:
        row["verdict"] = "diverge (corpus)" if corpus_div else "agree"
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def cmd_matrix(args: argparse.Namespace) -> int:
    from scenarios.sglang.executor import SglangExecutor

    releases = args.release or envs.releases_in_range()
    layouts = args.layout or ["1x2", "2x2"]
    dps = {"on": [True], "off": [False], "both": [True, False]}[args.dp_attention]
    rows = []
    print("| release | dp attention | layout | verdict | corpus | s to first divergence | "
          "shrunk ops | generated | replay |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for v in releases:
        try:
            ex = SglangExecutor(v, timeout_s=args.timeout, log=lambda m: print(m, file=sys.stderr))
        except CannotJudge as e:
            rows.append({"release": v, "verdict": f"cannot run here: {e.diagnosis}"})
            print(f"| {v} | - | - | cannot run here ({e.diagnosis[:60]}) | | | | | |", flush=True)
            continue
        with ex:
            for dp in dps:
                for lay in layouts:
                    try:
                        row = run_cell(ex, v, dp, lay, args.examples, args.seed,
                                       args.replay_dir, args.shrink_s)
                    except Exception as e:  # one broken cell must not hide the others
                        row = {"release": v, "dp_attention": dp, "layout": lay,
                               "verdict": f"error: {type(e).__name__}: {str(e)[:80]}"}
                    rows.append(row)
                    print(f"| {v} | {'on' if dp else 'off'} | {lay} | {row['verdict']} | "
                          f"{row.get('corpus', '')} | {row.get('first_s', '')} | "
                          f"{row.get('shrunk_ops', '')} | {row.get('examples', '')} | "
                          f"{Path(row['replay']).name if row.get('replay') else ''} |",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return int(ExitCode.AGREE)
