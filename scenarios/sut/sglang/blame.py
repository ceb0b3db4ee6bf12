"""Whose code raised: a rank's exception raised in the harness is not a verdict on SGLang.

A rank that fails on its own is a divergence ("error") only when SGLang failed. An exception
raised by the harness's own code (a seam that reads an attribute a release dropped, a bug in a
driver hook) says nothing about the release: its rank error is INFRASTRUCTURE, the verdict
`unknown` (exit 125) with where in the harness it was raised. Decided from the traceback: the
innermost frame of the exception, or of any exception in its cause / context chain, lies in
this repository's `scenarios/` package.
"""

from __future__ import annotations

import os
import re
import sys
from types import TracebackType

from scenarios.core.config import REPO_ROOT
from scenarios.core.errors import CollectiveError

#: the harness's own code (`scenarios/`)
HARNESS_DIR = os.path.join(str(REPO_ROOT), "scenarios") + os.sep


def _innermost(tb: TracebackType | None) -> tuple[str, int, str] | None:
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return None
    code = last.tb_frame.f_code
    return os.path.abspath(code.co_filename), last.tb_lineno, code.co_name


#: "Cls.method() takes 4 positional arguments but 5 were given": a call into a harness
#: override whose signature a release changed fails in the caller's frame, not in ours
_CALL = re.compile(r"^([A-Za-z_][\w.]*)\(\) (?:takes|got|missing)")


def _harness_callee(exc: BaseException) -> str | None:
    """The harness function a TypeError's bad call was aimed at, if it is one of ours."""
    m = _CALL.match(str(exc)) if isinstance(exc, TypeError) else None
    if m is None:
        return None
    path = m.group(1).split(".")
    for name, mod in list(sys.modules.items()):
        if not name.startswith("scenarios.") or mod is None:
            continue
        obj: object = mod
        for part in path:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        code = getattr(obj, "__code__", None)
        if code is not None and os.path.abspath(code.co_filename).startswith(HARNESS_DIR):
            rel = os.path.relpath(code.co_filename, str(REPO_ROOT))
            return f"{rel}:{code.co_firstlineno} in {m.group(1)} (called with another signature)"
    return None


def _harness_object(exc: BaseException) -> str | None:
    """SGLang read an attribute that a harness stand-in (a class of ours) does not have."""
    obj = getattr(exc, "obj", None) if isinstance(exc, AttributeError) else None
    cls = type(obj)
    if obj is None or not cls.__module__.startswith("scenarios."):
        return None
    return f"{cls.__module__}.{cls.__qualname__} (a harness stand-in) lacks '{exc.name}'"


def harness_origin(exc: BaseException) -> str | None:
    """`file:line in function` of harness code that raised `exc` (or an exception it came
    from), else None (SGLang, torch or the machine raised it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CollectiveError) and e.__cause__ is not None:
            # the recorder's typed re-raise of torch's own collective failure (a peer that
            # never came, or that crashed): whose failure it is lies in the cause
            e = e.__cause__
            continue
        callee = _harness_callee(e) or _harness_object(e)
        if callee is not None:
            return callee
        where = _innermost(e.__traceback__)
        if where is not None and where[0].startswith(HARNESS_DIR):
            path, line, fn = where
            return f"{os.path.relpath(path, str(REPO_ROOT))}:{line} in {fn}"
        e = e.__cause__ or e.__context__
    return None
