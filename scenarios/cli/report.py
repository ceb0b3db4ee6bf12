"""`cpcheck report merge DIR...`: the command line of scenarios/campaigns/report_merge.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scenarios.campaigns.report_merge import (
    check_inputs,
    check_one_nightly,
    keep_files,
    load_report,
    merge,
    write_merged,
)
from scenarios.cli.conventions import add_output_flags, emit_json, human
from scenarios.core.contract import STATUS_EXIT, ExitCode
from scenarios.judge.coverage import Coverage
from scenarios.store.report import check_writable


def add_report_subcommand(sub: Any, **sub_kw: Any) -> None:
    """`cpcheck report merge DIR... --out OUT` (cli.py calls this with its subparsers)."""
    rep = sub.add_parser("report", help="work on soak reports (merge the shards of a nightly)",
                         **sub_kw)
    rsub = rep.add_subparsers(dest="report_cmd", required=True)
    m = rsub.add_parser("merge", help="fold N soak reports into one verdict, coverage table "
                                      "and plots, keeping every replay file", **sub_kw)
    m.add_argument("dirs", nargs="+", metavar="DIR", help="a soak's --out folder (report.json)")
    m.add_argument("--out", default="cpcheck-out/merged",
                   help="the merged report.json, plots and replay files go here")
    add_output_flags(m)


def cmd_report(args: argparse.Namespace) -> int:
    """`cpcheck report merge`: exit with the merged verdict's code (130 if a shard was cut
    short and the rest agree, as the soak itself does)."""
    out = Path(args.out)
    dirs = check_inputs(args.dirs, out)
    reps = [load_report(d) for d in dirs]
    names = [str(d) for d in dirs]
    missing = check_one_nightly(reps, names)
    check_writable(out)
    kept = keep_files(dirs, out)
    merged, coverage = merge(reps, names, kept, missing)
    write_merged(out, merged, coverage)
    return _print(args, merged, coverage, out)


def _print(args: argparse.Namespace, m: dict, coverage: Coverage, out: Path) -> int:
    o = human(args)
    v = m["verdict"]
    print(f"outcome coverage ({m['runs']} runs):\n{coverage.table()}", file=o)
    print(f"merged {len(m['merged_from'])} report(s) "
          f"({', '.join(x['shard'] for x in m['merged_from'])}): layout={m['layout']} "
          f"variant={m['variant']} mode={m['mode']}: {m['runs']} runs, {m['decisions']} "
          f"decisions in {m['seconds']:.1f} s ({m['decisions_per_s']:.0f}/s over the shards); "
          f"faults {m['faults'] or 'none'}{'; INTERRUPTED' if m['interrupted'] else ''}", file=o)
    for x in m["merged_from"]:
        if x["status"] != "agree":
            print(f"  {x['shard']}: {x['status'].upper()}", file=o)
    if m["faults_never_fired"]:
        print(f"warning: fault(s) asked for but never fired on any shard: "
              f"{', '.join(m['faults_never_fired'])}", file=o)
    status = m["status"]
    if status == "diverge":
        print(f"DIVERGE [{v.get('invariant')}]: {v.get('message')}", file=o)
        mode = next(x["mode"] for x in m["merged_from"] if x["status"] == "diverge")
        print(f"replay: cpcheck replay {m['replay']}{f' --mode {mode}' if mode else ''}", file=o)
    elif status == "unknown":
        print(f"UNKNOWN: {v.get('diagnosis') or v.get('message')}", file=o)
    elif m["interrupted"]:
        print("INTERRUPTED: a shard was cut short; every run so far agreed", file=o)
    else:
        print("AGREE: every run of every shard agreed", file=o)
    if m["kept_files"]:
        print(f"kept {len(m['kept_files'])} replay file(s) in {out}", file=o)
    print(f"report: {out / 'report.json'}", file=o)
    code = (ExitCode.INTERRUPTED if m["interrupted"] and status == "agree"
            else STATUS_EXIT[status])
    emit_json(args, {"status": "interrupted" if code == ExitCode.INTERRUPTED else status,
                     "invariant": v.get("invariant"), "message": v.get("message"),
                     "diagnosis": v.get("diagnosis"), "exit_code": int(code),
                     "confirmed_by_replay": m["confirmed_by_replay"], "replay": m["replay"],
                     "report": str(out / "report.json")})
    return int(code)

