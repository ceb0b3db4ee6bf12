"""cpcheck's command line: run, replay, explore, soak, report merge, list, version.

Every subcommand ends with one exit code of the contract in scenarios/core/contract.py (table below):
bad input is one line and exit 2 before any work starts; a run that infrastructure broke is
`unknown` (125, which `git bisect run` skips); a divergence is replayed once before it is
reported (exit 1). `--json` prints the verdict as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reference.api import STORAGE_BACKENDS
from scenarios.cli.agent import add_multihost_flags, multihost_options
from scenarios.cli.conventions import (
    HelpFormatter,
    OneLineParser,
    VersionAction,
    add_output_flags,
    check_device,
    check_variant_arg,
    emit_status,
    emit_verdict,
    human,
    master_address,
    positive_float,
    positive_int,
    variant_help,
    version_text,
)
from scenarios.cli.protocol_args import add_protocol_arguments, protocol_changes
from scenarios.core.config import CP_LAYOUTS, EXPLORE_LAYOUTS
from scenarios.core.contract import ExitCode, Interrupted, classify, epilog, stop_requested
from scenarios.core.errors import CannotJudge, UsageError
from scenarios.core.suts import REFERENCE, is_sglang, sglang_tree, sglang_version
from scenarios.core.suts import check as check_sut
from scenarios.core.timeouts import DEFAULT_AGREEMENT_S
from scenarios.nemesis.mooncake_session import mooncake_for
from scenarios.runner.worker import DEVICES
from scenarios.sut.reference_executor import MODES
from scenarios.sut.sglang.consensus import line as consensus_line

# Mooncake's clients log ~70 INFO lines per run to stderr; read once, at its import
os.environ.setdefault("MC_LOG_LEVEL", "WARNING")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="torchrun",
                   help="ranks as threads (fast) or torchrun processes with gloo (the truth)")
    p.add_argument("--backend", choices=STORAGE_BACKENDS,
                   help="storage backend (default: the scenario's)")
    p.add_argument("--mooncake-master", metavar="HOST:PORT", default="", type=master_address,
                   help="use this Mooncake master instead of starting one (Mooncake backend)")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_AGREEMENT_S,
                   help="seconds a rank waits for its peers at one agreement; every other "
                   "wait of a run (collective, whole run, SGLang set-up) is a multiple of it")
    p.add_argument("--device", choices=DEVICES, default="auto")
    add_output_flags(p)
    add_multihost_flags(p)
    from scenarios.cli.sglang import add_sut_flags

    add_sut_flags(p)


class CliFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (cli_conventions) and the exit-code epilog kept line by line."""


def build_parser() -> argparse.ArgumentParser:
    sub_kw: dict[str, Any] = {"epilog": epilog(), "formatter_class": CliFormatter}
    ap = OneLineParser(prog="cpcheck", description=__doc__, **sub_kw)
    ap.add_argument("--version", action=VersionAction)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version", help="print the version", **sub_kw)
    sub.add_parser("list", help="list named scenarios and variants", **sub_kw)

    run = sub.add_parser("run", help="run one scenario on N ranks and print the verdict", **sub_kw)
    run.add_argument("scenario", help="a catalog name or a .toml / .json file")
    run.add_argument("--layout", help="TPxCP[xPP], e.g. 2x2 (default: the scenario's)")
    run.add_argument("--variant", help=variant_help("default: the scenario's"))
    run.add_argument("--replay-dir", default="cpcheck-out", help="where a failure's replay goes")
    _add_common(run)
    add_protocol_arguments(run)

    rep = sub.add_parser("replay", help=f"rerun a replay file: exit {ExitCode.AGREE:d} agree, "
                                        f"{ExitCode.DIVERGE:d} diverge, {ExitCode.UNKNOWN:d} "
                                        "cannot judge", **sub_kw)
    rep.add_argument("file")
    rep.add_argument("--find-fix", action="store_true",
                     help="for `git bisect run` over a fix: exit 0 while the divergence "
                          "reproduces and 1 once the run agrees (125 and 2 unchanged), so "
                          "`git bisect start --term-old=broken --term-new=fixed NEW OLD` names "
                          "the first fixed commit")
    _add_common(rep)
    rep.set_defaults(mode=None)

    ex = sub.add_parser("explore", help="let Hypothesis hunt for a divergence", **sub_kw)
    ex.add_argument("--variant", default="fixed", help=variant_help("variant to hunt in"))
    ex.add_argument("--layout", action="append", help="repeatable; default 1x2 2x2 1x4 2x1")
    ex.add_argument("--examples", type=positive_int, default=200)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--replay-dir", default="cpcheck-out")
    ex.add_argument("--differential", action="store_true",
                    help="with --sut sglang==V: run each Schedule on the reference profile of V "
                         "and on V, and hunt for the first difference between them")
    _add_common(ex)
    add_protocol_arguments(ex)
    ex.set_defaults(mode="inprocess")

    soak = sub.add_parser("soak", help="free-running soak with faults, a report and plots",
                          **sub_kw)
    from scenarios.cli.soak import add_soak_arguments

    add_soak_arguments(soak)
    from scenarios.cli.report import add_report_subcommand

    add_report_subcommand(sub, **sub_kw)
    from scenarios.cli.agent import add_agent_subcommand

    add_agent_subcommand(sub, **sub_kw)
    from scenarios.cli.sglang import add_subcommands

    add_subcommands(sub, _add_common, **sub_kw)
    return ap


@contextlib.contextmanager
def _executor(args: argparse.Namespace, sut: str, backend: str | None,
              mode: str) -> Iterator[Any]:
    """The SUT's executor for one command, with the Mooncake master it needs (the one given,
    or one started here and always stopped)."""
    from scenarios.sut import executor_for

    check_device(args.device)
    if is_sglang(sut):  # its executor starts its own master (metrics too)
        with executor_for(sut, timeout_s=args.timeout, mooncake_master=args.mooncake_master,
                          **multihost_options(args, "torchrun")) as ex:
            yield ex
        return
    if mode == "torchrun":
        # import it before any temp dir exists: a Ctrl-C landing inside this import's C++
        # callbacks aborts the process (pybind11 cannot carry the exception)
        import torch.distributed  # noqa: F401
    with mooncake_for(backend, args.mooncake_master) as (master, _), \
            executor_for(sut, mode, timeout_s=args.timeout, mooncake_master=master,
                         device=args.device, **multihost_options(args, mode)) as ex:
        yield ex


def _header(s: Any, mode: str) -> str:
    """The run's one-line description (what ran, on which SUT, in which configuration)."""
    if is_sglang(s.sut):
        dp = "on" if s.dp_attention else "off"
        return f"layout={s.layout} sut={s.sut} dp_attention={dp} backend={s.backend}"
    from reference.api import effective_configuration

    # what really runs: an alias variant (tp_only_sync) names its own profile and setting
    profile, on = effective_configuration(s.protocol, s.dp_attention, s.variant)
    return (f"layout={s.layout} variant={s.variant} protocol={profile.name} "
            f"dp_attention={'on' if on else 'off'} backend={s.backend} mode={mode}")


def finish(args: argparse.Namespace, verdict: Any, replay: Path | None) -> int:
    """Print the verdict (and the JSON object); return its exit code."""
    out = human(args)
    print(verdict.summary(), file=out)
    if verdict.status == "diverge":
        for inv, msg in verdict.failures[1:6]:
            print(f"  also [{inv}]: {msg}", file=out)
        print("confirmed by replay", file=out)
    notes = list(verdict.stats.get("not_observed", []))
    for note in notes:
        print(f"  not observable on SGLang: {note}", file=out)
    if replay is not None:
        again = "diff" if "differential" in verdict.stats else "replay"
        print(f"replay: cpcheck {again} {replay}", file=out)
    tree = verdict.stats.get("sglang_tree")
    if tree:  # --sut sglang@PATH: which code ran
        print(f"  sglang tree: {tree['path']} at {tree['commit'] or 'no git commit'}"
              f"{' (dirty)' if tree['dirty'] else ''}; dependencies of sglang=={tree['env']}",
              file=out)
    said = verdict.stats.get("consensus_checker")
    if said:  # SGLang's own rank-consensus checker ran beside ours
        print(f"  SGLang's rank-consensus checker: {consensus_line(said)}", file=out)
    emit_verdict(args, verdict, replay=replay, **({"not_observed": notes} if notes else {}),
                 **({"sglang_tree": tree} if tree else {}),
                 **({"consensus_checker": said} if said else {}))
    return verdict.exit_code


def _write_if_found(args: argparse.Namespace, s: Any, verdict: Any, mode: str) -> Path | None:
    """A replay file for a confirmed divergence, or an `unknown-...` one for a flaky one."""
    from scenarios.store.replay import replay_data, replay_name, write_replay

    if verdict.status == "diverge" or "confirmation" in verdict.stats:
        data = replay_data(s, verdict, mode, confirmation=verdict.stats.get("confirmation"))
        if verdict.status == "diverge":  # on stderr first: a full disk loses nothing
            print(f"replay file {replay_name(s, verdict)}:\n"
                  f"{json.dumps(data, indent=1, default=str)}", file=sys.stderr, flush=True)
        try:
            return write_replay(s, verdict, args.replay_dir, mode, data=data)
        except OSError as e:  # the verdict stands; say what could not be saved
            print(f"cpcheck: warning: could not save {replay_name(s, verdict)} in "
                  f"{args.replay_dir}: {e.strerror or e} (the verdict stands; its contents "
                  "are on stderr above)", file=sys.stderr, flush=True)
    return None


def _release_known(file: str, sut: str) -> None:
    """A release (or source tree) named by a replay file that this commit (or machine) does not
    know is `unknown` (125: a file from elsewhere), not bad input as the same name given with
    --sut is."""
    from scenarios.sut.sglang.envs import check_runnable
    from scenarios.sut.sglang.tree import check_tree

    try:
        tree = sglang_tree(sut)
        check_tree(tree) if tree is not None else check_runnable(sut.split("==", 1)[1])
    except UsageError as e:
        raise CannotJudge(f"{file}: {e}") from None


def _master_needs_mooncake(args: argparse.Namespace, backend: str | None) -> None:
    """--mooncake-master with another backend would be ignored: say so (exit 2)."""
    if args.mooncake_master and backend != "mooncake":
        raise UsageError(f"--mooncake-master needs the mooncake backend (this run uses "
                         f"{backend!r}; pass --backend mooncake)")


# -- subcommands ---------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from scenarios.generate.catalog import load_scenario
    from scenarios.judge.judging import confirm, run_checked
    from scenarios.store.report import check_writable

    proto = protocol_changes(args)
    s = load_scenario(args.scenario)
    changes = {k: v for k, v in (("layout", args.layout), ("variant", args.variant),
                                 ("backend", args.backend), ("sut", args.sut)) if v}
    changes.update(proto)
    if changes:
        s = s.from_dict({**s.model_dump(), **changes}, args.scenario)
    mode = "torchrun" if is_sglang(s.sut) else args.mode
    check_writable(Path(args.replay_dir), "--replay-dir", create=False)
    _master_needs_mooncake(args, s.backend)
    with _executor(args, s.sut, s.backend, mode) as ex:
        _, verdict = run_checked(ex, s)
        verdict = confirm(ex, s, verdict)
    print(f"{s.name} {_header(s, mode)}", file=human(args))
    return finish(args, verdict, _write_if_found(args, s, verdict, mode))


def cmd_replay(args: argparse.Namespace) -> int:
    from scenarios.judge.judging import confirm, run_checked
    from scenarios.runner import max_ranks_here
    from scenarios.store.replay import read_replay

    s, data = read_replay(args.file)
    changes = {k: v for k, v in (("backend", args.backend), ("sut", args.sut)) if v}
    if changes:
        s = s.from_dict({**s.model_dump(), **changes}, args.file)
    sglang = is_sglang(s.sut)
    if sglang and not args.sut:
        _release_known(args.file, s.sut)
    mode = "torchrun" if sglang else (args.mode or data.get("mode", "torchrun"))
    _master_needs_mooncake(args, s.backend)
    if mode == "torchrun" and s.layout_obj.world_size > max_ranks_here():  # threads: any
        raise CannotJudge(f"layout {s.layout} needs {s.layout_obj.world_size} ranks; "
                          f"this machine runs at most {max_ranks_here()}")
    with _replay_executor(args, s, data, mode) as ex:
        _, verdict = run_checked(ex, s)
        verdict = confirm(ex, s, verdict)
    out = human(args)
    print(f"replay {args.file}: {_header(s, mode)}"
          f"{' differential' if data.get('differential') else ''}", file=out)
    was = data.get("verdict") or {}
    if was:
        status = was.get("status") or ("agree" if was.get("ok") else "diverge")
        print(f"recorded: {status.upper()}"
              f"{' [' + str(was.get('invariant')) + ']' if status != 'agree' else ''}", file=out)
    code = finish(args, verdict, None)
    if args.find_fix and code in (ExitCode.AGREE, ExitCode.DIVERGE):
        code = int(ExitCode.DIVERGE if code == ExitCode.AGREE else ExitCode.AGREE)
        print(f"--find-fix: exit {code} ({'fixed' if code else 'still broken'})", file=out)
    return code


def _replay_executor(args: argparse.Namespace, s: Any, data: dict, mode: str) -> Any:
    """A differential replay file reruns as `cpcheck diff FILE` does; any other on its SUT."""
    diff = data.get("differential")
    if diff:
        from scenarios.campaigns.differential import DifferentialExecutor

        version = sglang_version(s.sut)
        if version is None:
            raise UsageError(f"{args.file}: a differential replay file names no SGLang "
                             "release (rerun it with: cpcheck diff FILE --sut sglang==V)")
        return DifferentialExecutor(version, diff.get("protocol"), timeout_s=args.timeout)
    return _executor(args, s.sut, s.backend, mode)


def _differential_executor(args: argparse.Namespace, sut: str) -> Any:
    """explore --differential: bad input (no release, another backend) is exit 2 here."""
    version = sglang_version(sut)
    if version is None:
        raise UsageError("--differential needs --sut sglang==VERSION (the release to compare "
                         "with the reference profile that models it)")
    if (args.backend or "memory") != "memory":
        raise UsageError(f"--differential compares runs on the memory backend, not "
                         f"{args.backend!r}")
    from scenarios.campaigns.differential import DifferentialExecutor

    return DifferentialExecutor(version, getattr(args, "protocol", None),
                                timeout_s=args.timeout)


def cmd_explore(args: argparse.Namespace) -> int:
    from scenarios.campaigns.explore import hunt
    from scenarios.core.layout import Layout
    from scenarios.generate.strategies import for_sut
    from scenarios.store.report import check_writable

    proto = protocol_changes(args)
    sut = check_sut(args.sut or REFERENCE)
    sglang = is_sglang(sut)
    check_writable(Path(args.replay_dir), "--replay-dir", create=False)
    layouts = tuple(args.layout or (CP_LAYOUTS if sglang else EXPLORE_LAYOUTS))
    for lay in layouts:
        Layout.parse(lay)  # a bad --layout is a usage error before Hypothesis starts
    check_variant_arg(args.variant)
    _master_needs_mooncake(args, args.backend or "memory")
    mode = "torchrun" if sglang else args.mode
    if args.differential:  # the reference's profile is the executor's, not the Schedule's
        proto.pop("protocol", None)
    strategy = for_sut(sut, layouts, variant=args.variant, backend=args.backend,
                       **{"dp_attention": True, **proto})
    out = human(args)
    with (_differential_executor(args, sut) if args.differential
          else _executor(args, sut, args.backend, mode)) as ex:
        h = hunt(ex, strategy, args.examples, args.seed)
    if h.coverage is not None and h.examples:  # which outcomes the schedules reached
        print(f"outcome coverage over {h.examples} schedules:\n{h.coverage.table()}", file=out)
    for line in h.infra_errors[:3]:
        print(f"not judged (infrastructure): {line[:200]}", file=out)
    if h.found is None or h.verdict is None:
        print(f"no divergence in {h.examples} schedules ({h.seconds_total:.1f} s)", file=out)
        from scenarios.core.verdict import Verdict

        return finish(args, Verdict(True, message=f"no divergence in {h.examples} "
                                                  f"schedules"), None)
    if args.differential and h.verdict.status == "diverge":
        print("differential finding: rerun it with cpcheck diff FILE (docs/differential.md)",
              file=out)
    print(f"divergence after {h.seconds_to_first:.2f} s; shrunk to {h.steps} ops "
          f"({h.examples} schedules, {h.seconds_total:.1f} s)", file=out)
    return finish(args, h.verdict, _write_if_found(args, h.found, h.verdict, mode))


def cmd_list(args: argparse.Namespace) -> int:
    from reference.api import DEFAULT_PROFILE, PROFILES, VARIANTS
    from scenarios.generate.catalog import catalog_names

    print("scenarios: " + " ".join(catalog_names()))
    for name, what in VARIANTS.items():
        print(f"variant {name}: {what}")
    for p in PROFILES.values():
        print(f"protocol {p.name}{' (default)' if p.name == DEFAULT_PROFILE else ''}: {p.summary}")
    return int(ExitCode.AGREE)


def cmd_version(args: argparse.Namespace) -> int:
    print(version_text())
    return int(ExitCode.AGREE)


# -- signals -------------------------------------------------------------------------------
def _raise_interrupted(signum: int, frame: Any) -> None:
    stop_requested.set()  # seen by long loops even if this exception gets swallowed
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGINT and SIGTERM raise in the main thread (and set `stop_requested`), so temp dirs
    and children are cleaned up by the `with` blocks."""
    stop_requested.clear()
    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        from scenarios.cli import EARLY_SIGNALS

        if EARLY_SIGNALS:  # a signal came while cpcheck was loading: act on it now
            _raise_interrupted(EARLY_SIGNALS.pop(), None)
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):
                if signal.getsignal(sig) is _raise_interrupted:
                    signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Parse, run one subcommand, map whatever ended it to the exit-code contract.

    `argv=None` means this is the process (the `cpcheck` script): after an interrupt it exits
    at once (`os._exit`) rather than wait for Mooncake clients retrying in rank threads.
    """
    args = build_parser().parse_args(argv)
    handlers = {"version": cmd_version, "list": cmd_list, "run": cmd_run,
                "replay": cmd_replay, "explore": cmd_explore}
    from scenarios.cli.sglang import handlers as sglang_handlers

    handlers.update(sglang_handlers())
    if args.cmd == "soak":
        from scenarios.cli.soak import cmd_soak

        handlers["soak"] = lambda a: cmd_soak(a, argv)
    if args.cmd == "agent":
        from scenarios.cli.agent import cmd_agent

        handlers["agent"] = cmd_agent
    if args.cmd == "report":
        from scenarios.cli.report import cmd_report

        handlers["report"] = cmd_report
    try:
        if args.cmd in ("run", "explore"):  # bad multi-host flags: exit 2 before any work
            lay = args.layout
            multihost_options(args, args.mode, lay if isinstance(lay, list) else [lay] if lay else [])
        with signals_unwind():
            code = handlers[args.cmd](args)
        if argv is None and (code == ExitCode.INTERRUPTED or args.cmd == "soak"):
            # the soak wrote its report; the `with` blocks cleaned up; a rank thread stuck on
            # a lost master must not hold the exit
            _exit_now(code)
        return code
    except BaseException as e:  # noqa: BLE001 - every ending maps to the contract
        if isinstance(e, SystemExit):
            raise
        code, line = classify(e)
        status = {ExitCode.USAGE: "usage", ExitCode.UNKNOWN: "unknown",
                  ExitCode.INTERRUPTED: "interrupted"}.get(code, "unknown")
        if code == ExitCode.INTERRUPTED:
            print("cpcheck: interrupted; every child process was stopped", file=sys.stderr)
        elif code == ExitCode.USAGE:
            print(f"cpcheck: {line}", file=sys.stderr)
        else:
            print(f"cpcheck: cannot judge here: {line}", file=sys.stderr)
            if getattr(args, "verbose", False):
                import traceback

                traceback.print_exception(e, file=sys.stderr)
        emit_status(args, status, code, line)
        if code == ExitCode.INTERRUPTED and argv is None:
            _exit_now(code)
        return int(code)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: rank threads may still sit in Mooncake client
    calls that retry for seconds, and tearing those clients down is what made Ctrl-C slow."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))


if __name__ == "__main__":
    sys.exit(main())
