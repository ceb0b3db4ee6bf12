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
import functools
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: collectives a call may issue through any receiver (torch.distributed, a process group,
#: SGLang's GroupCoordinator)
GROUP_COLLECTIVES = frozenset({
    "all_reduce", "barrier", "monitored_barrier", "all_gather", "all_gather_object",
    "all_gather_into_tensor", "broadcast", "broadcast_object_list", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather_object"})
#: counted only through torch.distributed or a process group: a zmq socket also `send`s, a
#: tensor `scatter`s and `gather`s
P2P = frozenset({"send", "recv", "isend", "irecv", "send_object_list", "recv_object_list",
                 "scatter", "gather", "reduce"})
DIST_NAMES = frozenset({"dist", "torch.distributed", "distributed", "torch.distributed.distributed_c10d"})
#: decorators that issue collectives around the call they wrap
DECORATORS = frozenset({"rank_consensus"})
#: receivers through which the cache calls its controller
CONTROLLER_RECEIVERS = frozenset({"cache_controller", "cc", "controller"})
CONTROLLER_FILE = "managers/cache_controller.py"
DOC = "docs/sglang-collective-paths.md"
OBSERVED = "docs/sglang-collective-paths.json"


@dataclass(frozen=True)
class Issuer:
    """A function that issues a collective: where, and how (direct calls, wrappers called)."""

    file: str  # relative to sglang/srt
    qualname: str
    line: int
    issues: tuple[str, ...]
    #: issues collectives only through `@rank_consensus`, which SGLang makes a no-op unless
    #: SGLANG_ENABLE_RANK_CONSENSUS_CHECKER is set when the module is imported
    checker_only: bool = False

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
            elif (f.attr in P2P and (recv in DIST_NAMES or last.endswith("group"))) or (
                    f.attr in GROUP_COLLECTIVES and recv):
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


@functools.lru_cache(maxsize=4096)
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

    def closure(direct: dict[int, set[str]]) -> dict[int, set[str]]:
        issues = {k: set(v) for k, v in direct.items()}
        changed = True
        while changed:  # wrappers of wrappers: to a fixed point
            changed = False
            for fn in funcs:
                for name, m in callees(fn):
                    if m is not fn and issues[id(m)] and f"via {name}" not in issues[id(fn)]:
                        issues[id(fn)].add(f"via {name}")
                        changed = True
        return issues

    issues = closure({id(fn): set(fn.direct) for fn in funcs})
    always = closure({id(fn): {d for d in fn.direct if not d.startswith("@")} for fn in funcs})
    return sorted((Issuer(fn.file, fn.qualname, fn.line, tuple(sorted(issues[id(fn)])),
                          checker_only=not always[id(fn)])
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
    """The release's issuers. Only files that can matter are parsed (parsing every cache module
    takes half a minute): those naming a collective or `rank_consensus`, then, until none is
    added, those that call a function found issuing. A call resolves by name, so a file that
    names no issuer cannot add one."""
    import re

    texts: dict[str, str] = {}
    for p in scanned_files(srt):
        try:
            texts[p.relative_to(srt).as_posix()] = p.read_text()
        except (OSError, UnicodeDecodeError):
            continue
    names = sorted(GROUP_COLLECTIVES | P2P | DECORATORS)
    pattern = re.compile(r"\b(?:" + "|".join(names) + r")\b")
    chosen = {f for f, text in texts.items() if pattern.search(text)}
    while True:
        sources = {f: texts[f] for f in chosen if _parses(texts[f], f)}
        found = issuers_in(sources)
        called = {i.qualname.rsplit(".", 1)[-1] for i in found}
        more = {f for f, text in texts.items() if f not in chosen
                and any(f"{n}(" in text for n in called)}
        if not more:
            return found
        chosen |= more


def _parses(text: str, file: str) -> bool:
    try:
        _functions(text, file)  # cached: issuers_in reads it again
    except SyntaxError:
        return False
    return True


# -- why a function no Schedule reaches is out of reach (the first pattern that matches) --------
UNREACHED: tuple[tuple[str, str], ...] = (
    ("Mamba", "hybrid SSM models only: cpcheck builds plain MHA pools"),
    ("SWA", "hybrid sliding-window models only: cpcheck builds plain MHA pools"),
    ("mem_cache/storage/", "a storage backend cpcheck does not drive (it runs SGLang's file "
     "backend and MooncakeStore's KV path)"),
    ("EmbeddingCacheController", "the multimodal embedding cache, not the KV cache"),
    ("DecodeKVCacheOffloadManager", "decode-side offload of decoded KV "
     "(`--disaggregation-decode-enable-offload-kvcache`): not driven"),
    ("linker", "the unified cache's external linker: only hybrid/disaggregated component "
     "layouts attach one (see below)"),
    ("sparsity", "sparse attention (hisparse) only"),
    ("hisparse", "sparse attention (hisparse) only"),
)


def why_unreached(issuer: Issuer, server_class: str) -> str:
    if issuer.checker_only:
        return ("issues only through `@rank_consensus`, a no-op unless "
                "SGLANG_ENABLE_RANK_CONSENSUS_CHECKER is set (off in the traced runs)")
    where = f"{issuer.file}:{issuer.qualname}"
    for pattern, why in UNREACHED:
        if pattern in where:
            return why
    owner = issuer.qualname.split(".", 1)[0]
    if owner in ("HiRadixCache", "UnifiedRadixCache") and server_class and owner != server_class:
        return f"this release's server builds {server_class}"
    return "no collective from it in the traced runs (not called, or its group had one rank)"


# -- the table --------------------------------------------------------------------------------
def _cell(ops: list[str]) -> str:
    return ", ".join(f"`{o}`" for o in ops)


def driven_class(observed: dict) -> str:
    """The cache class the traced runs drove, as their verdicts name it ("... (HiRadixCache)")."""
    import re

    found = {m.group(1) for _, line in observed.get("runs", [])
             if (m := re.search(r"\((\w+Cache)\)$", line))}
    return "/".join(sorted(found))


def render(version: str, issuers: list[Issuer], observed: dict) -> str:
    """One release's table: each collective-issuing function, what it issues, and the ops
    that reached it in the traced runs (or why none does)."""
    seen = observed.get("functions", {})
    server_class = driven_class(observed)
    runs = observed.get("runs", [])
    rows = [f"Release {version}: the traced runs drove `{server_class or '?'}`; "
            f"{len(issuers)} functions issue collectives, "
            f"{sum(1 for i in issuers if seen.get(i.key))} reached by "
            f"{len(runs)} traced Schedules.", "",
            "| function | file:line | issues | reached by ops |", "|---|---|---|---|"]
    for i in issuers:
        ops = seen.get(i.key)
        reach = _cell(ops) if ops else f"not reached: {why_unreached(i, server_class)}"
        rows.append(f"| `{i.qualname}` | `{i.file}:{i.line}` | {', '.join(i.issues)}"
                    f"{' (checker only)' if i.checker_only else ''} | {reach} |")
    scanned = ("mem_cache/", CONTROLLER_FILE, "disaggregation/decode")
    extra = sorted(k for k in observed.get("issued_in", [])
                   if k.startswith(scanned) and k not in {i.key for i in issuers})
    if extra:
        rows += ["", "Seen issuing at run time but not found in the source (an extractor gap): "
                 + ", ".join(f"`{k}`" for k in extra)]
    return "\n".join(rows)


def block_name(version: str) -> str:
    return f"collective-paths-{version}"


def load_observed(path: str | Path = OBSERVED) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def release_block(version: str, observed: dict) -> str | None:
    """The rendered table for `version` from its built environment, or None when absent."""
    from scenarios.sut.sglang import envs

    srt = envs.release_dir(version) / "sglang" / "srt"
    if not srt.is_dir():
        return None
    return render(version, release_issuers(srt), observed.get(version, {}))


# -- the traced runs ----------------------------------------------------------------------------
def trace(version: str, log: object = print) -> dict:
    """Run the traced Schedules on `version` with the path trace on; merge what every rank saw
    into {"functions": {file:qualname: [ops]}, "issued_in": [innermost functions],
    "runs": [[schedule, verdict]]}."""
    from scenarios.sut.sglang import path_trace
    from scenarios.sut.sglang.executor import SglangExecutor
    from scenarios.sut.sglang.paths_schedules import traced

    folder = tempfile.mkdtemp(prefix="cpcheck-paths-")
    os.environ[path_trace.ENV] = folder
    runs: list[list[str]] = []
    try:
        with SglangExecutor(version, build=False, log=log) as ex:
            for s in traced(f"sglang=={version}"):
                try:
                    v = ex.judge(s, ex.run(s))
                    runs.append([s.name, v.summary().splitlines()[0][:160]])
                except Exception as e:  # a run that broke still traced what it reached
                    runs.append([s.name, f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"])
                log(f"{version} {runs[-1][0]}: {runs[-1][1]}")
    finally:
        os.environ.pop(path_trace.ENV, None)
    functions: dict[str, set[str]] = {}
    innermost: set[str] = set()
    for p in Path(folder).glob("*.json"):
        seen = json.loads(p.read_text())
        for file, qual, op, _coll in seen["frames"]:
            functions.setdefault(f"{file}:{qual}", set()).add(op)
        innermost |= {f"{file}:{qual}" for file, qual in seen["innermost"]}
    return {"functions": {k: sorted(v) for k, v in sorted(functions.items())},
            "issued_in": sorted(innermost), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    from scenarios.core.contract import ExitCode
    from scenarios.store.doc_tables import write_block

    ap = argparse.ArgumentParser(prog="python -m scenarios.sut.sglang.collective_paths",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="*", help="releases (default: those in the observations)")
    ap.add_argument("--trace", action="store_true", help="run the traced Schedules on each "
                    "release (SGLang pools: minutes) and update the observations file")
    ap.add_argument("--observed", default=OBSERVED, help="the observations file")
    ap.add_argument("--write", default="", help="write the tables into this docs file")
    args = ap.parse_args(argv)
    observed = load_observed(args.observed)
    versions = args.versions or sorted(observed)
    if not versions:
        print("collective_paths: no release named and no observations", file=sys.stderr)
        return int(ExitCode.USAGE)
    if args.trace:
        for v in versions:
            observed[v] = trace(v)
            Path(args.observed).write_text(json.dumps(observed, indent=1, sort_keys=True) + "\n")
    for v in versions:
        body = release_block(v, observed)
        if body is None:
            print(f"collective_paths: sglang {v} is not built here "
                  f"(python -m scenarios.sut.sglang.envs {v})", file=sys.stderr)
            return int(ExitCode.USAGE)
        if args.write:
            write_block(args.write, block_name(v), body,
                        f"python -m scenarios.sut.sglang.collective_paths {v} --write {DOC}",
                        title="Every path of SGLang's HiCache that issues a collective")
        else:
            print(body + "\n")
    return int(ExitCode.AGREE)


if __name__ == "__main__":
    sys.exit(main())
