"""Each rank's collectives on SGLang's groups, written to a file as each call starts.

gloo aborts a process (SIGABRT, `Received data size doesn't match expected size. Is there a
distributed collective mismatch`) when the peers of a group issue collectives of different
sizes: the rank dies before it can return what it recorded. These files outlive it, so the
executor can still say where the ranks' sequences parted (`first_mismatch`): a finding about
the release, not a broken machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

NAME = "collectives-r{rank}.log"


class CallLog:
    def __init__(self, storage_dir: str, rank: int) -> None:
        self.f = open(os.path.join(storage_dir, NAME.format(rank=rank)), "a")  # noqa: SIM115

    def write(self, group: str, call: Any) -> None:
        shape = "" if call.shape is None else f" {list(call.shape)} {call.dtype}"
        self.f.write(f"{group}\t{call.op}{shape}\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read(storage_dir: str | Path) -> dict[int, list[tuple[str, str]]]:
    out: dict[int, list[tuple[str, str]]] = {}
    for p in sorted(Path(storage_dir).glob(NAME.format(rank="*"))):
        rank = int(p.stem.rsplit("-r", 1)[1])
        out[rank] = [tuple(line.split("\t", 1)) for line in p.read_text().splitlines()
                     if "\t" in line]  # type: ignore[misc]
    return out


def first_mismatch(storage_dir: str | Path) -> str | None:
    """Where two ranks' calls on one group first differ ("group, call #i: rank a X, rank b
    Y"), or None when every group's calls agree as far as each rank got: a log that stops
    early is a rank that died, not a mismatch, so only the calls both ranks logged compare."""
    from scenarios.judge.checker import first_mismatch as first_difference

    per_group: dict[str, dict[int, list[str]]] = {}
    for rank, calls in read(storage_dir).items():
        for group, call in calls:
            per_group.setdefault(group, {}).setdefault(rank, []).append(call)
    found: list[tuple[int, str, str]] = []
    for group in sorted(per_group):
        ranks = sorted(per_group[group].items())
        base_rank, base = ranks[0]
        for rank, calls in ranks[1:]:
            n = min(len(base), len(calls))
            m = first_difference(base[:n], calls[:n])
            if m is not None:
                i, a, b = m
                found.append((i, group, f"{group}, call #{i}: rank {base_rank} {a}, "
                                        f"rank {rank} {b}"))
    return min(found)[2] if found else None
