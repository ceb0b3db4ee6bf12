"""Named scenarios: small TOML files that are Schedules with a little sugar.

An `add` op may give `shared`, `shared_len`, `own_len` instead of explicit tokens: requests with
the same `shared` id share a prefix of that many tokens. Unknown fields are rejected with the
file, the line and the field named.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from scenarios.core.config import CATALOG_DIR
from scenarios.core.schedule import Schedule, ScheduleError, tokens_for

_SUGAR = ("shared", "shared_len", "own_len")


def catalog_names() -> list[str]:
    return sorted(p.stem for p in CATALOG_DIR.glob("*.toml"))


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".toml", ".json") and p.exists():
        return p
    q = CATALOG_DIR / f"{name_or_path}.toml"
    if q.exists():
        return q
    raise ScheduleError(f"scenario '{name_or_path}' not found: give a path or one of "
                        f"{', '.join(catalog_names())}")


def _line_of(text: str, field: str, start: int = 0) -> int | None:
    for i, line in enumerate(text.splitlines()[start:], start + 1):
        if re.match(rf"\s*\"?{re.escape(field)}\"?\s*=", line) or f"[{field}]" in line:
            return i
    return None


def _line_of_loc(text: str, loc: tuple) -> int | None:
    """The line of a field given its path: `ops.3.rid` is `rid` under the 4th `[[ops]]`."""
    lines = text.splitlines()
    if len(loc) >= 2 and loc[0] == "ops" and isinstance(loc[1], int):
        heads = [i for i, ln in enumerate(lines) if ln.strip() == "[[ops]]"]
        if loc[1] < len(heads):
            start = heads[loc[1]]
            end = heads[loc[1] + 1] if loc[1] + 1 < len(heads) else len(lines)
            if len(loc) > 2:
                line = _line_of("\n".join(lines[:end]), str(loc[2]), start)
                if line is not None:
                    return line
            return start + 1
    if not loc:
        return None
    top = _line_of(text, str(loc[0]))
    if top is None:
        return _line_of(text, str(loc[-1]))
    if len(loc) > 1 and lines[top - 1].strip().startswith("["):  # a table: its key's line
        return _line_of(text, str(loc[1]), top) or top
    return top


def load_scenario(name_or_path: str) -> Schedule:
    path = resolve(name_or_path)
    if path.suffix == ".json":
        return Schedule.from_json_file(path)
    text = path.read_text()
    if not text.strip():
        raise ScheduleError(f"{path}: empty file (a scenario needs at least one op)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScheduleError(f"{path}: {e}") from None
    data.pop("description", None)
    ops = []
    for i, op in enumerate(data.get("ops", [])):
        op = dict(op)
        if any(k in op for k in _SUGAR):
            try:
                shared, shared_len, own_len = (int(op.pop(k)) for k in _SUGAR)
            except KeyError as e:
                raise ScheduleError(f"{path}: ops[{i}]: needs all of shared, shared_len, own_len "
                                    f"(missing {e})") from None
            for k, v in zip(_SUGAR, (shared, shared_len, own_len), strict=True):
                if v < 0:
                    line = _line_of_loc(text, ("ops", i, k))
                    raise ScheduleError(f"{path}:{line}: field 'ops.{i}.{k}': must be >= 0 "
                                        f"(got {v})", ("ops", i, k), "greater_than_equal")
            op["tokens"] = tokens_for(shared, shared_len, i, own_len)
        ops.append(op)
    if ops:
        data["ops"] = ops
    try:
        return Schedule.from_dict(data, str(path))
    except ScheduleError as e:
        line = _line_of_loc(text, e.loc)
        if line is not None:
            raise ScheduleError(str(e).replace(f"{path}:", f"{path}:{line}:", 1), e.loc, e.kind,
                                e.cause) from None
        raise
