"""cpcheck's command line: run, replay, explore, soak, list, version.

Bad input ends with one line naming the problem and exit code 2; `replay` exits 0 / 1 / 125
for `git bisect run`.
"""

from __future__ import annotations

import argparse
import functools
import sys

from scenarios.cli_conventions import HelpFormatter, VersionAction, variant_help, version_text
from scenarios.mooncake_session import CannotRun, mooncake_for
from scenarios.protocol_args import add_protocol_arguments, protocol_changes

EXIT_AGREE, EXIT_DIVERGE, EXIT_USAGE, EXIT_CANNOT_RUN = 0, 1, 2, 125


class UsageError(Exception):
    """A one-line user error."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["inprocess", "torchrun"], default="torchrun",
                   help="ranks as threads (fast) or torchrun processes with gloo (the truth)")
    p.add_argument("--backend", choices=["memory", "file", "mooncake"],
                   help="storage backend (default: the scenario's)")
    p.add_argument("--mooncake-master", metavar="HOST:PORT", default="",
                   help="use this Mooncake master instead of starting one")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds any rank may wait on a peer before the run fails")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    from scenarios.sglang.cli import add_sut_flags

    add_sut_flags(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cpcheck", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--version", action=VersionAction)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=HelpFormatter))
    sub.add_parser("version", help="print the version")
    sub.add_parser("list", help="list named scenarios and variants")

    run = sub.add_parser("run", help="run one scenario on N ranks and print the verdict")
    run.add_argument("scenario", help="a catalog name or a .toml / .json file")
    run.add_argument("--layout", help="TPxCP[xPP], e.g. 2x2 (default: the scenario's)")
    run.add_argument("--variant", help=variant_help("default: the scenario's"))
    run.add_argument("--replay-dir", default="cpcheck-out", help="where a failure's replay goes")
    _add_common(run)
    add_protocol_arguments(run)

    rep = sub.add_parser("replay", help="rerun a replay file: exit 0 agree, 1 diverge, 125 cannot run")
    rep.add_argument("file")
    _add_common(rep)
    rep.set_defaults(mode=None)

    ex = sub.add_parser("explore", help="let Hypothesis hunt for a divergence")
    ex.add_argument("--variant", default="fixed", help=variant_help("variant to hunt in"))
    ex.add_argument("--layout", action="append", help="repeatable; default 1x2 2x2 1x4 2x1")
    ex.add_argument("--examples", type=int, default=200)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--replay-dir", default="cpcheck-out")
    _add_common(ex)
    add_protocol_arguments(ex)
    ex.set_defaults(mode="inprocess")

    soak = sub.add_parser("soak", help="free-running soak with faults, a report and plots")
    try:
        from scenarios.soak import add_soak_arguments
    except ImportError:  # pragma: no cover - soak lands separately
        add_soak_arguments = None
    if add_soak_arguments is not None:
        add_soak_arguments(soak)
    from scenarios.sglang.cli import add_subcommands

    add_subcommands(sub, _add_common)
    return ap


def _executor(args: argparse.Namespace, master: str, mode: str):  # noqa: ANN202
    from scenarios.executor import Executor

    return Executor(mode, timeout_s=args.timeout, mooncake_master=master, device=args.device)


def cmd_run(args: argparse.Namespace) -> int:
    from scenarios.catalog import load_scenario
    from scenarios.checker import check
    from scenarios.replay import write_replay

    proto = protocol_changes(args)
    s = load_scenario(args.scenario)
    changes = {k: v for k, v in (("layout", args.layout), ("variant", args.variant),
                                 ("backend", args.backend)) if v}
    changes.update(proto)
    if changes:
        s = s.from_dict({**s.model_dump(), **changes}, args.scenario)
    if (args.sut or s.sut) != "reference":
        from scenarios.sglang import cli as sglang_cli

        return sglang_cli.cmd_run(args, s)
    with mooncake_for(s.backend, args.mooncake_master) as (master, _), \
            _executor(args, master, args.mode) as ex:
        verdict = check(s, ex.run(s))
    print(f"{s.name} layout={s.layout} variant={s.variant} protocol={s.protocol} "
          f"dp_attention={'on' if s.dp_attention else 'off'} backend={s.backend} mode={args.mode}")
    print(verdict.summary())
    if not verdict.ok:
        for inv, msg in verdict.failures[1:6]:
            print(f"  also [{inv}]: {msg}")
        path = write_replay(s, verdict, args.replay_dir, args.mode)
        print(f"replay: cpcheck replay {path}")
        return EXIT_DIVERGE
    return EXIT_AGREE


def cmd_replay(args: argparse.Namespace) -> int:
    from scenarios.checker import check
    from scenarios.replay import read_replay
    from scenarios.runner import max_ranks_here

    s, data = read_replay(args.file)
    if args.backend:
        s = s.with_(backend=args.backend)
    if (args.sut or s.sut) != "reference":
        from scenarios.sglang import cli as sglang_cli

        return sglang_cli.cmd_replay(args, s, data)
    mode = args.mode or data.get("mode", "torchrun")
    if s.layout_obj.world_size > max_ranks_here():
        raise CannotRun(f"layout {s.layout} needs {s.layout_obj.world_size} ranks; "
                        f"this machine runs at most {max_ranks_here()}")
    with mooncake_for(s.backend, args.mooncake_master) as (master, _), \
            _executor(args, master, mode) as ex:
        verdict = check(s, ex.run(s))
    print(f"replay {args.file}: layout={s.layout} variant={s.variant} protocol={s.protocol} "
          f"dp_attention={'on' if s.dp_attention else 'off'} mode={mode}")
    print(verdict.summary())
    was = data.get("verdict", {})
    if was:
        print(f"recorded: {'AGREE' if was.get('ok') else 'DIVERGE [' + str(was.get('invariant')) + ']'}")
    return EXIT_AGREE if verdict.ok else EXIT_DIVERGE


def cmd_explore(args: argparse.Namespace) -> int:
    from scenarios.explore import hunt
    from scenarios.replay import write_replay

    proto = protocol_changes(args)
    if args.sut and args.sut != "reference":
        from scenarios.sglang import cli as sglang_cli

        return sglang_cli.cmd_explore(args)
    layouts = tuple(args.layout or ["1x2", "2x2", "1x4", "2x1"])
    with mooncake_for(args.backend, args.mooncake_master) as (master, _), \
            _executor(args, master, args.mode) as ex:
        h = hunt(ex, args.variant, layouts, args.examples, args.seed, args.backend or "memory",
                 **proto)
    if h.coverage is not None:  # which outcomes the schedules reached
        print(f"outcome coverage over {h.examples} schedules:\n{h.coverage.table()}")
    if h.found is None or h.verdict is None:
        print(f"no divergence in {h.examples} schedules ({h.seconds_total:.1f} s)")
        return EXIT_AGREE
    print(f"divergence after {h.seconds_to_first:.2f} s; shrunk to {h.steps} ops "
          f"({h.examples} schedules, {h.seconds_total:.1f} s)")
    print(h.verdict.summary())
    path = write_replay(h.found, h.verdict, args.replay_dir, args.mode)
    print(f"replay: cpcheck replay {path}")
    return EXIT_DIVERGE


def cmd_list(_: argparse.Namespace) -> int:
    from reference.api import DEFAULT_PROFILE, PROFILES, VARIANTS
    from scenarios.catalog import catalog_names

    print("scenarios: " + " ".join(catalog_names()))
    for name, what in VARIANTS.items():
        print(f"variant {name}: {what}")
    for p in PROFILES.values():
        print(f"protocol {p.name}{' (default)' if p.name == DEFAULT_PROFILE else ''}: {p.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from scenarios.schedule import ScheduleError

    args = build_parser().parse_args(argv)
    handlers = {"version": lambda a: print(version_text()) or 0, "list": cmd_list,
                "run": cmd_run, "replay": cmd_replay, "explore": cmd_explore}
    from scenarios.sglang.cli import handlers as sglang_handlers

    handlers.update(sglang_handlers())
    if args.cmd == "soak":
        from scenarios.soak import cmd_soak

        handlers["soak"] = cmd_soak
    try:
        return handlers[args.cmd](args)
    except CannotRun as e:
        print(f"cpcheck: cannot run here: {e}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print("cpcheck: interrupted; every child process was stopped", file=sys.stderr)
        return 130
    except (ScheduleError, UsageError, ValueError, OSError) as e:
        print(f"cpcheck: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"cpcheck: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_CANNOT_RUN if "start" in str(e).lower() else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())


