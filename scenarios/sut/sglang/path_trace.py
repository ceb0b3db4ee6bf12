"""Which SGLang functions issued each collective of a run, and during which Schedule op.

On only where `CPCHECK_SGLANG_PATH_TRACE` names a folder (collective_paths.py --trace sets it
for the pools it starts): every collective the recorder sees (rank.py) notes the SGLang
functions on the calling thread's stack (file under `sglang/srt/`, qualified name) and the op
the rank was applying; the rank writes what it saw into the folder at the end of the run.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

ENV = "CPCHECK_SGLANG_PATH_TRACE"
#: what a collective is attributed to outside any op
BUILD, DRAIN = "(cache build)", "(end-of-run drain)"
_SRT = f"{os.sep}sglang{os.sep}srt{os.sep}"


def folder() -> str | None:
    return os.environ.get(ENV) or None


def frames(start: Any) -> list[tuple[str, str]]:
    """(file under sglang/srt, qualified name) of each SGLang frame from `start` outwards; a
    nested function counts as the function it is defined in, and a decorator's wrapper also
    names the function it wraps (`@rank_consensus` runs its collective before the call)."""
    out: list[tuple[str, str]] = []
    f = start
    while f is not None:
        path = f.f_code.co_filename
        at = path.find(_SRT)
        if at >= 0:
            rel = path[at + len(_SRT):].replace(os.sep, "/")
            out.append((rel, f.f_code.co_qualname.split(".<locals>", 1)[0]))
            wrapped = f.f_locals.get("func") or f.f_locals.get("fn")
            code = getattr(wrapped, "__code__", None)
            if code is not None and _SRT in code.co_filename and code is not f.f_code:
                rel_w = code.co_filename[code.co_filename.find(_SRT) + len(_SRT):]
                out.append((rel_w.replace(os.sep, "/"), code.co_qualname))
        f = f.f_back
    return out


class PathTrace:
    def __init__(self) -> None:
        self.op = BUILD
        self.lock = threading.Lock()
        self.seen: set[tuple[str, str, str, str]] = set()  # (file, qualname, op, collective)
        self.innermost: set[tuple[str, str]] = set()  # the SGLang function nearest the call

    def note(self, collective: str) -> None:
        found = frames(sys._getframe(2))
        with self.lock:
            for file, qual in found:
                self.seen.add((file, qual, self.op, collective))
            if found:
                self.innermost.add(found[0])

    def write(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"frames": sorted(self.seen), "innermost": sorted(self.innermost)}, f)
        os.replace(tmp, path)
