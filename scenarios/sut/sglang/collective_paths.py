"""Every function of a release's HiCache that issues a collective, and the Schedule ops that
reach it on the SGLang SUT.

Read from each built release's own source (`ast`, nothing imported): the cache modules
(`srt/mem_cache/**`), the controller (`srt/managers/cache_controller.py`) and the decode side of
PD disaggregation (`srt/disaggregation/decode*` files that offload or restore through HiCache).
A function issues a collective when it calls one (`torch.distributed.all_reduce`, `barrier`,
`all_gather*`, `broadcast*`, `send` / `recv`, or a process group's method of that name), when it
carries `@rank_consensus` (SGLang's decorator that agrees a call's parameters across ranks), or
when it calls a function that does (`_all_reduce_attn_groups`, `_all_reduce_prefetch_groups`,
...): wrappers are followed through `self.`, the cache controller and module functions.

Which ops reach a function is measured, not typed: `--trace` runs the catalog Schedules (and
the decode-role and prefetch host-alloc Schedules, paths_schedules.py) on each release with
`CPCHECK_SGLANG_PATH_TRACE` set, and every collective a rank records notes the SGLang functions
on its stack and the op the rank was applying (rank.py). Those observations are committed
(docs/sglang-collective-paths.json); the table is rendered from them and from the source:
    python -m scenarios.sut.sglang.collective_paths --trace 0.5.11   # SGLang runs, minutes
    python -m scenarios.sut.sglang.collective_paths --write docs/sglang-collective-paths.md
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: collectives a call may issue through any receiver (torch.distributed, a process group,
#: SGLang's GroupCoordinator)
GROUP_COLLECTIVES = frozenset({
    "all_reduce", "barrier", "monitored_barrier", "all_gather", "all_gather_object",
    "all_gather_into_tensor", "broadcast", "broadcast_object_list", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "gather_object",
    "scatter", "reduce"})
#: point-to-point calls, counted only through torch.distributed (a zmq socket also `send`s)
P2P = frozenset({"send", "recv", "isend", "irecv", "send_object_list", "recv_object_list"})
DIST_NAMES = frozenset({"dist", "torch.distributed", "distributed", "torch.distributed.distributed_c10d"})
#: decorators that issue collectives around the call they wrap
DECORATORS = frozenset({"rank_consensus"})
#: receivers through which the cache calls its controller
CONTROLLER_RECEIVERS = frozenset({"cache_controller", "cc", "controller"})
CONTROLLER_FILE = "managers/cache_controller.py"
#: the op label for collectives outside any op: building the cache and the end-of-run drain
BUILD, DRAIN = "(cache build)", "(end-of-run drain)"


@dataclass(frozen=True)
class Issuer:
    """A function that issues a collective: where, and how (direct calls, wrappers called)."""

    file: str  # relative to sglang/srt
    qualname: str
    line: int
    issues: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.file}:{self.qualname}"


@dataclass
class _Func:
    file: str
    qualname: str
    cls: str | None
    line: int
    direct: set[str] = field(default_factory=set)
    calls: set[tuple[str, str]] = field(default_factory=set)  # (receiver kind, name)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return ""


def _scan_body(fn: _Func, body: ast.AST) -> None:
    for node in ast.walk(body):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute):
            recv = _dotted(f.value)
            last = recv.rsplit(".", 1)[-1]
            if recv == "self":
                fn.calls.add(("self", f.attr))
            elif last in CONTROLLER_RECEIVERS:
                fn.calls.add(("controller", f.attr))
            elif f.attr in P2P and recv in DIST_NAMES:
                fn.direct.add(f.attr)
            elif f.attr in GROUP_COLLECTIVES and recv:
                fn.direct.add(f.attr)
            else:
                fn.calls.add(("attr", f.attr))
        elif isinstance(f, ast.Name):
            if f.id in GROUP_COLLECTIVES | P2P:  # `from torch.distributed import all_reduce`
                fn.direct.add(f.id)
            fn.calls.add(("name", f.id))


def _decorators(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    out = set()
    for d in node.decorator_list:
        name = _dotted(d.func if isinstance(d, ast.Call) else d).rsplit(".", 1)[-1]
        if name in DECORATORS:
            out.add(f"@{name}")
    return out


def _functions(source: str, file: str) -> tuple[list[_Func], dict[str, list[str]]]:
    """Every function and method of a module (nested functions count as their parent's
    body) and each class's base class names."""
    tree = ast.parse(source)
    funcs: list[_Func] = []
    bases: dict[str, list[str]] = {}

    def add(node: ast.FunctionDef | ast.AsyncFunctionDef, cls: str | None) -> None:
        fn = _Func(file, f"{cls}.{node.name}" if cls else node.name, cls, node.lineno)
        fn.direct |= _decorators(node)
        for stmt in node.body:
            _scan_body(fn, stmt)
        funcs.append(fn)

    for top in tree.body:
        if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add(top, None)
        elif isinstance(top, ast.ClassDef):
            bases[top.name] = [_dotted(b).rsplit(".", 1)[-1] for b in top.bases]
            for item in top.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    add(item, top.name)
    return funcs, bases


def issuers_in(sources: dict[str, str]) -> list[Issuer]:
    """The collective-issuing functions of these modules ({path under srt: source})."""
    funcs: list[_Func] = []
    bases: dict[str, list[str]] = {}
    for file, src in sorted(sources.items()):
        f, b = _functions(src, file)
        funcs += f
        bases.update(b)
    by_method: dict[tuple[str, str], _Func] = {}
    module_fns: dict[str, list[_Func]] = {}
    controller: dict[str, list[_Func]] = {}
    for fn in funcs:
        name = fn.qualname.rsplit(".", 1)[-1]
        if fn.cls is None:
            module_fns.setdefault(name, []).append(fn)
        else:
            by_method[(fn.cls, name)] = fn
            if fn.file == CONTROLLER_FILE:
                controller.setdefault(name, []).append(fn)

    def method(cls: str | None, name: str, seen: frozenset = frozenset()) -> _Func | None:
        if cls is None or cls in seen:
            return None
        got = by_method.get((cls, name))
        if got is not None:
            return got
        for b in bases.get(cls, []):
            got = method(b, name, seen | {cls})
            if got is not None:
                return got
        return None

    def callees(fn: _Func) -> Iterable[tuple[str, _Func]]:
        for kind, name in fn.calls:
            if kind == "self":
                m = method(fn.cls, name)
                if m is not None:
                    yield name, m
            elif kind == "controller":
                for m in controller.get(name, []):
                    yield name, m
            elif kind == "name":
                same = [m for m in module_fns.get(name, []) if m.file == fn.file]
                for m in same or module_fns.get(name, []):
                    yield name, m

    issues: dict[int, set[str]] = {id(fn): set(fn.direct) for fn in funcs}
    changed = True
    while changed:  # wrappers of wrappers: to a fixed point
        changed = False
        for fn in funcs:
            for name, m in callees(fn):
                if m is not fn and issues[id(m)] and f"via {name}" not in issues[id(fn)]:
                    issues[id(fn)].add(f"via {name}")
                    changed = True
    return sorted((Issuer(fn.file, fn.qualname, fn.line, tuple(sorted(issues[id(fn)])))
                   for fn in funcs if issues[id(fn)]), key=lambda i: (i.file, i.line))


def scanned_files(srt: Path) -> list[Path]:
    """The release's cache modules, its controller and its decode-side HiCache modules."""
    files = sorted(p for p in (srt / "mem_cache").rglob("*.py"))
    cc = srt / CONTROLLER_FILE
    files += [cc] if cc.exists() else []
    dis = srt / "disaggregation"
    if dis.is_dir():
        files += sorted(p for p in dis.glob("decode*.py")
                        if any(w in p.name for w in ("hicache", "offload", "kvcache")))
    return files


def release_issuers(srt: Path) -> list[Issuer]:
    sources = {}
    for p in scanned_files(srt):
        try:
            sources[p.relative_to(srt).as_posix()] = p.read_text()
        except (OSError, UnicodeDecodeError):
            continue
    return [i for i in issuers_in(sources)]
