"""`cpcheck soak --shard I/N`: one nightly definition, N runners, each with its own part.

A nightly spread over N runners must not run the same chunks N times: every runner is given the
same base seed and the same layout list, and derives from its shard number alone the seed it
soaks with and the layout it soaks on. The derivation is pure (string-seeded `random.Random`,
stable across processes and Python versions), so `cpcheck report merge` can say afterwards which
shard ran what, and rerunning shard I with the same definition reruns exactly that part.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from scenarios.core.errors import UsageError
from scenarios.core.layout import Layout

_SHARD_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class ShardPlan:
    """What one runner soaks: its derived seed and layout, and where they came from."""

    index: int  # 1-based, as written on the command line
    count: int
    base_seed: int
    seed: int
    layout: str
    layouts: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"shard": f"{self.index}/{self.count}", "index": self.index,
                "count": self.count, "base_seed": self.base_seed,
                "layouts": list(self.layouts)}


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' with 1 <= I <= N, or a UsageError naming what is wrong."""
    m = _SHARD_RE.match(text or "")
    if m is None:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 1/3")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise UsageError(f"--shard {text.strip()}: N must be at least 1")
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text.strip()}: I must be between 1 and {n}")
    return i, n


def parse_layouts(text: str) -> tuple[str, ...]:
    """A comma list of layouts, each normalised ('2X2' -> '2x2'); LayoutError on a bad one."""
    items = [t for t in (s.strip() for s in str(text).split(",")) if t]
    if not items:
        raise UsageError(f"--layout {text!r}: no layout given")
    return tuple(str(Layout.parse(t)) for t in items)


def shard_seed(base_seed: int, index: int, count: int) -> int:
    """The seed shard `index` of `count` soaks with: the base seed itself for 1/1 (an unsharded
    soak and `--shard 1/1` are the same run), a distinct derived one otherwise."""
    if count == 1:
        return base_seed
    return random.Random(f"cpcheck-shard:{base_seed}:{index}/{count}").randrange(1 << 31)


def plan_shard(layout_arg: str, base_seed: int, shard_arg: str | None) -> ShardPlan:
    """Seed and layout of this run; without `--shard`, exactly one layout may be given."""
    layouts = parse_layouts(layout_arg)
    if shard_arg is None:
        if len(layouts) > 1:
            raise UsageError(f"--layout {layout_arg}: {len(layouts)} layouts; a soak runs one "
                             f"(pass --shard I/N to spread a list over N runners)")
        return ShardPlan(1, 1, base_seed, base_seed, layouts[0], layouts)
    i, n = parse_shard(shard_arg)
    return ShardPlan(i, n, base_seed, shard_seed(base_seed, i, n),
                     layouts[(i - 1) % len(layouts)], layouts)


def shard_line(plan: ShardPlan) -> str:
    """What the soak's first stderr line adds for a shard ('' for an unsharded soak)."""
    if plan.count == 1 and plan.layouts == (plan.layout,):
        return ""
    return (f" (shard {plan.index}/{plan.count} of base seed {plan.base_seed}, "
            f"layout {plan.layout})")
