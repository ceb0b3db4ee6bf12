"""The one client loop: drive one rank of any system under test through a Schedule's ops.

Every SUT (the reference, an SGLang release) is an adapter with the `SutRank` methods; this
loop is the only place that decides how ranks stay in step, how long the drain lasts, and how a
failed rank tells its peers (the FAILED flag), so the SUTs cannot drift apart on any of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from scenarios.core.config import DRAIN_STEPS
from scenarios.core.errors import ErrorKind, PeerFailed
from scenarios.core.records import Eviction, RankError, Snapshot

#: the harness-sync flag of a rank whose run failed: its peers stop at the same sync
FAILED = 2


class SutRank(Protocol):
    """One rank of a system under test, as the client loop drives it."""

    def open(self) -> None:
        """Build this rank's cache for the run (may issue the SUT's own collectives)."""

    def apply(self, op: Any) -> None:
        """One Schedule op (add, step, abort, evict_device, evict_host)."""

    def step(self) -> None:
        """One scheduler step (the SUT's event checks and prefetch progress)."""

    def busy(self) -> bool:
        """IO or agreements still in flight on this rank."""

    def draining(self) -> None:
        """The ops are done: gated IO may now run to the end."""

    def finish(self) -> Snapshot:
        """The post-run snapshot (and read-backs), taken before any peer cleans up."""

    def sync(self, flag: int) -> int:
        """The harness's own MAX over every rank (not the SUT's collectives)."""

    def machine_broke(self, e: BaseException) -> str | None:
        """What the harness was doing if the machine, not the SUT, broke the run; else None."""

    def unblock(self) -> None:
        """Release whatever this rank's IO threads wait on (a failed run must not hang)."""

    def close(self) -> None:
        """Shut the cache down and release the run's resources; never raises."""


@dataclass
class RankRun:
    """What the loop saw on one rank; the adapter adds its own records to make a RankResult."""

    ops_done: int = 0
    snapshot: Snapshot | None = None
    error: RankError | None = None
    evictions: list[Eviction] = field(default_factory=list)


def run_rank(sut: SutRank, ops: list[Any], *, gated: bool, free_run_s: float = 0.0,
             drain_steps: int = DRAIN_STEPS) -> RankRun:
    """Open, apply every op in step with the peers, drain, snapshot, close. Never raises for a
    run failure: the error is part of the result, and the peers stop at their next sync."""
    out = RankRun()
    in_sync = False

    def sync(flag: int) -> int:
        nonlocal in_sync
        in_sync = True
        got = sut.sync(flag)
        if got >= FAILED:  # every rank saw it at this same sync: nobody left to tell
            raise PeerFailed("a peer rank failed; stopped with it (peer not agreed to go on)")
        in_sync = False
        return got

    try:
        sut.open()
        for op in ops:
            busy = op.kind.startswith("evict") and bool(sut.busy())
            sut.apply(op)
            if op.kind.startswith("evict"):  # coverage: with IO in flight; differential: order
                residency = getattr(sut, "residency", None)
                out.evictions.append(Eviction(op.kind, busy,
                                              residency() if residency is not None else None))
            out.ops_done += 1
            # the model's forward pass keeps ranks in lockstep per scheduler step in production
            # (its TP/CP collectives); without it a variant that drops the cache's own syncs
            # would let one rank race ahead and make shared-storage runs timing-dependent
            sync(0)
        sut.draining()
        _drain(sut, sync, gated, free_run_s, drain_steps)
        out.snapshot = sut.finish()
        sync(0)  # clients own their objects (Mooncake drops them on close): all have looked
    except Exception as e:  # the result carries it; the checker turns it into a verdict
        where = sut.machine_broke(e)
        out.error = RankError.of(e, ErrorKind.INFRASTRUCTURE if where else None, where or "")
        if not in_sync:  # tell the peers at their next sync (not after a broken sync itself)
            sut.unblock()
            try:
                sut.sync(FAILED)
            except Exception:
                pass
    finally:
        sut.unblock()
        sut.close()
    return out


def _drain(sut: SutRank, sync: Any, gated: bool, free_run_s: float, steps: int) -> None:
    """Step until no rank is busy. Gated: `steps` steps at most, as the Schedule fixes.
    Free-running: also until `free_run_s` passed, since real IO (a backup across a Mooncake
    master restart) may outlast the steps. "Go on" is a MAX, so every rank leaves together."""
    deadline = time.monotonic() + free_run_s
    step = 0
    while True:
        sut.step()
        over = step >= steps - 1 and (gated or time.monotonic() > deadline)
        if not sync(int(sut.busy() and not over)):
            return
        step += 1
        if not gated:
            time.sleep(0.002)
