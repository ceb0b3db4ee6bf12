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

from scenarios.schedule import Schedule, ScheduleError, tokens_for

CATALOG_DIR = Path(__file__).parent / "catalog"
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


def _line_of(text: str, field: str) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(field)}\s*=", line) or f"[{field}]" in line:
            return i
    return None


def load_scenario(name_or_path: str) -> Schedule:
    path = resolve(name_or_path)
    if path.suffix == ".json":
        return Schedule.from_json_file(path)
    text = path.read_text()
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
            op["tokens"] = tokens_for(shared, shared_len, i, own_len)
        ops.append(op)
    if ops:
        data["ops"] = ops
    try:
        return Schedule.from_dict(data, str(path))
    except ScheduleError as e:
        m = re.search(r"field '([^']+)'", str(e))
        field = m.group(1).split(".")[-1] if m else ""
        line = _line_of(text, field) if field else None
        if line is not None:
            raise ScheduleError(str(e).replace(f"{path}:", f"{path}:{line}:", 1)) from None
        raise
