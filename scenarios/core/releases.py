"""Which reference protocol profile models each SGLang release (one table, shared by the oracle
and differential mode). The profiles are named after the release they were read from; the table
starts each at the first release with the same protocol: 0.5.14 and 0.5.15 are sglang-0.5.14's
exactly; 0.5.16 .. 0.5.18 (hit queue, progress still agreed once at termination) are judged with
it too; per-batch progress acks with a prefetch-sync thread arrive in 0.5.19, which is
sglang-0.5.20's. 0.5.21 .. 0.5.23 (no hiradix_cache.py; UnifiedRadixCache as in 0.5.19 and
0.5.20) carry the same decision points, read side by side from the 0.5.20 and 0.5.23 wheels
(docs/design/protocol-by-release.md): sglang-0.5.20 judges them too."""

from __future__ import annotations

import re

#: (first release, profile), newest first; 0.5.9 .. 0.5.10.post1 predate PR #20460
PROFILE_FOR: tuple[tuple[str, str], ...] = (
    ("0.5.19", "sglang-0.5.20"), ("0.5.14", "sglang-0.5.14"), ("0.5.13", "sglang-0.5.13"),
    ("0.5.11", "sglang-0.5.11"), ("0.5.9", "sglang-0.5.10"),
)


def release_tuple(version: str) -> tuple[int, ...]:
    """'0.5.10.post1' -> (0, 5, 10, 1); '0.5.11' -> (0, 5, 11, 0)."""
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", version)
    if m is None:
        raise ValueError(f"not a release number: '{version}'")
    return tuple(int(g or 0) for g in m.groups())


def profile_for(version: str) -> str:
    v = release_tuple(version)
    for start, name in PROFILE_FOR:
        if v >= release_tuple(start):
            return name
    return PROFILE_FOR[-1][1]


def profile_of_sut(sut: str) -> str | None:
    """The profile modelling `sglang==V`, None for the reference itself."""
    return profile_for(sut.split("==", 1)[1]) if sut.startswith("sglang==") else None
