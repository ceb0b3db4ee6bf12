"""One definition each: cache settings and their defaults, policy / backend names, variants and
profiles, exit codes. Each test fails if a second definition creeps back in and drifts."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import typing
from pathlib import Path

from reference.api import (
    PROFILES,
    STOP_POLICIES,
    STORAGE_BACKENDS,
    VARIANTS,
    WRITE_POLICIES,
    CacheConfig,
)
from scenarios.cli.main import build_parser
from scenarios.core.contract import ExitCode
from scenarios.core.schedule import CachePolicy, Schedule
from scenarios.generate.workload import INTENTS
from scenarios.runner.worker import DEVICES
from scenarios.sut.reference_executor import MODES

REPO = Path(__file__).resolve().parent.parent
#: CachePolicy field -> CacheConfig's (the Schedule counts the prefetch timeout in ticks)
SAME_SETTING = {"page_size": "page_size", "device_pages": "device_pages",
                "host_pages": "host_pages", "write_policy": "write_policy",
                "prefetch_stop_policy": "prefetch_stop_policy",
                "prefetch_threshold": "prefetch_threshold",
                "prefetch_batch_pages": "prefetch_batch_pages"}


def test_schedule_cache_defaults_are_the_references() -> None:
    ref = CacheConfig()
    policy = CachePolicy()
    assert {f: getattr(policy, f) for f in SAME_SETTING} == {
        f: getattr(ref, g) for f, g in SAME_SETTING.items()}
    assert policy.mla == ref.kv.is_mla
    # every CachePolicy field is either one of the reference's or the tick-counted timeout
    assert set(CachePolicy.model_fields) == {*SAME_SETTING, "mla", "prefetch_timeout_ticks"}
    assert {f.name for f in dataclasses.fields(CacheConfig)} >= set(SAME_SETTING.values())


def test_schedule_accepts_exactly_the_references_names() -> None:
    def literal(model: type, field: str) -> tuple:
        return typing.get_args(model.model_fields[field].annotation)

    assert literal(CachePolicy, "write_policy") == WRITE_POLICIES
    assert literal(CachePolicy, "prefetch_stop_policy") == STOP_POLICIES
    assert literal(Schedule, "backend") == STORAGE_BACKENDS
    assert set(INTENTS) == set(STOP_POLICIES)  # the shaped workloads know every stop policy


def _options(parser: argparse.ArgumentParser, flag: str) -> dict[str, tuple | None]:
    """subcommand -> the choices of `flag` there (subcommands without the flag left out)."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if flag in action.option_strings:
                out[name] = tuple(action.choices) if action.choices is not None else None
    return out


def test_cli_choices_come_from_the_one_definition() -> None:
    parser = build_parser()
    backends = _options(parser, "--backend")
    assert set(backends) >= {"run", "replay", "explore", "soak"}
    assert set(backends.values()) == {STORAGE_BACKENDS}
    assert set(_options(parser, "--mode").values()) == {MODES}
    assert set(_options(parser, "--device").values()) == {DEVICES}


def test_readme_lists_every_variant_and_profile() -> None:
    """The README's variant table has one row per variant reference/variants.py knows, and the
    profile table one column per profile."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("\n| variant | profiles |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert rows == [v for v in VARIANTS if v != "fixed"]
    header = next(line for line in readme.splitlines()
                  if line.startswith("| |") and "`sglang-" in line)
    assert re.findall(r"`(sglang-[\d.]+)`", header) == list(PROFILES)


def _exit_code_literals(source: str, where: str) -> list[str]:
    """Integer literals of the exit codes only contract.py may spell, and sys.exit(<literal>)."""
    codes = {int(c) for c in ExitCode} - {0, 1, 2}  # 0 / 1 / 2 are too common to scan for
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value in codes:
            found.append(f"{where}:{node.lineno}: {node.value}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "exit" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "sys" and node.args
                and isinstance(node.args[0], ast.Constant)):
            found.append(f"{where}:{node.lineno}: sys.exit(literal)")
    return found


def test_exit_code_numbers_live_in_contract_only() -> None:
    """No module but scenarios/core/contract.py spells 125 or 130 (or exits with a literal)."""
    found = [hit for path in sorted((REPO / "scenarios").rglob("*.py"))
             if path.name != "contract.py"
             for hit in _exit_code_literals(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []
    # the scan fires on what it exists to catch (the help text this commit fixed had a 125)
    planted = 'help="exit 0 agree, " + str(125)\nsys.exit(2)\n'
    assert len(_exit_code_literals(planted, "planted.py")) == 2


def _assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def _layout_tuples(source: str) -> list[int]:
    """Lines with a literal sequence of two or more layout strings ("1x2", "2x2", ...)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Tuple | ast.List) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str)
                and re.fullmatch(r"\d+x\d+(x\d+)?", e.value) for e in node.elts):
            out.append(node.lineno)
    return out


def test_page_size_and_default_layouts_live_in_config_only() -> None:
    """PAGE was defined three times and default layouts six: scenarios/core/config.py holds
    them; another module that assigns PAGE or spells a default layout list fails here."""
    from scenarios.core import config

    assert CacheConfig().page_size == config.PAGE
    found = []
    for path in sorted((REPO / "scenarios").rglob("*.py")):
        if path.name == "config.py":
            continue
        src = path.read_text()
        if "PAGE" in _assigned_names(src):
            found.append(f"{path.relative_to(REPO)}: PAGE =")
        found += [f"{path.relative_to(REPO)}:{n}: layouts" for n in _layout_tuples(src)]
    assert found == []
    assert _layout_tuples('LAYOUTS = ("1x2", "2x2")\nx = ["2x2x2", "1x4"]\n') == [1, 2]
    assert "PAGE" in _assigned_names("PAGE = 4\n")


def _exception_classes(source: str) -> list[str]:
    """Public classes whose bases name an exception (…Error, …Exception, …Timeout, ...)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = [ast.unparse(b) for b in node.bases]
            if any(re.search(r"(Error|Exception|Timeout|Interrupt|Judge|Wait|Stopped)$", b)
                   or b in ("Exception", "BaseException") for b in bases):
                out.append(node.name)
    return out


def test_exceptions_live_in_the_errors_module_only() -> None:
    """26 exception classes were spread over 14 modules; each now carries its exit code and
    rank kind from one of a few bases in scenarios/core/errors.py."""
    from scenarios.core import errors

    found = [f"{path.relative_to(REPO)}: {name}"
             for path in sorted((REPO / "scenarios").rglob("*.py"))
             if path.name not in ("errors.py", "contract.py")
             for name in _exception_classes(path.read_text())]
    assert found == []
    assert _exception_classes("class GateTimeout(RuntimeError):\n    pass\n") == ["GateTimeout"]
    # every harness error classifies by its type alone; the one that carries a finding (ranks
    # that issued different collectives, seen after gloo killed them) exits as a divergence
    carries_a_finding = {"CollectiveMismatchDied"}
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.CpcheckError):
            allowed = (ExitCode.DIVERGE,) if name in carries_a_finding else (
                ExitCode.USAGE, ExitCode.UNKNOWN)
            assert cls.exit_code in allowed, name


def _timeout_multiples(source: str, where: str) -> list[str]:
    """`timeout * <number>` / `<number> * timeout` / `timeout + <number>` arithmetic: a wait
    derived from --timeout outside scenarios/core/timeouts.py."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Add):
            sides = (node.left, node.right)
            named = [s for s in sides if "timeout" in ast.unparse(s).lower()]
            number = [s for s in sides if isinstance(s, ast.Constant)
                      and isinstance(s.value, int | float)]
            if named and number:
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_waits_derive_from_one_timeout_in_one_place() -> None:
    """Every wait of a run is a multiple of --timeout spelt in scenarios/core/timeouts.py only,
    and every --timeout defaults to one of its constants."""
    from scenarios.core import timeouts

    found = [hit for path in sorted((REPO / "scenarios").rglob("*.py"))
             if path.name != "timeouts.py"
             for hit in _timeout_multiples(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []
    assert _timeout_multiples("deadline = time.monotonic() + timeout_s * 6 + 60\n", "p.py")
    defaults = {a.default for sub in _subparsers(build_parser()) for a in sub._actions
                if "--timeout" in a.option_strings}
    assert defaults <= {timeouts.DEFAULT_AGREEMENT_S, timeouts.SGLANG_AGREEMENT_S}, defaults
    t = timeouts.Timeouts(7.0)  # the order the module promises: each fires before the next
    assert t.agreement_s < t.collective_s < t.run_s < t.sglang_setup_s


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subs.choices.values())


def test_no_argparse_namespace_travels_below_the_cli() -> None:
    """argparse lives in scenarios/cli/ (and in a process's own entry point: a module's
    `main` / `_parse_args` for `python -m`): a campaign, the runner or a SUT takes plain
    values or a config, never `args`."""
    offenders = []
    for path in sorted((REPO / "scenarios").rglob("*.py")):
        if "cli" in path.relative_to(REPO / "scenarios").parts:
            continue
        tree = ast.parse(path.read_text())
        own_main = {n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                    and n.name in ("main", "_parse_args")}
        inside_main = {id(x) for f in own_main for x in ast.walk(f)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "argparse" and id(node) not in inside_main):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: argparse.{node.attr}")
    assert offenders == []
