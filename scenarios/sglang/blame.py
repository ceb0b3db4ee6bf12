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
from types import TracebackType

#: the harness's own code (this package's parent: `scenarios/`)
HARNESS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _innermost(tb: TracebackType | None) -> tuple[str, int, str] | None:
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return None
    code = last.tb_frame.f_code
    return os.path.abspath(code.co_filename), last.tb_lineno, code.co_name


def harness_origin(exc: BaseException) -> str | None:
    """`file:line in function` of harness code that raised `exc` (or an exception it came
    from), else None (SGLang, torch or the machine raised it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        where = _innermost(e.__traceback__)
        if where is not None and where[0].startswith(HARNESS_DIR):
            path, line, fn = where
            return f"{os.path.relpath(path, os.path.dirname(HARNESS_DIR.rstrip(os.sep)))}:" \
                   f"{line} in {fn}"
        e = e.__cause__ or e.__context__
    return None
