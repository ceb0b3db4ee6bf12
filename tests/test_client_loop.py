"""The one client loop (scenarios/client/loop.py), on a fake SUT: both real SUTs use it, so
how ranks stay in step, how long a drain lasts and how a failed rank stops its peers is
decided once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from scenarios.client.loop import FAILED, PeerFailed, run_rank
from scenarios.core.config import DRAIN_STEPS
from scenarios.core.errors import ErrorKind
from scenarios.core.records import Snapshot
from scenarios.core.schedule import Op


class MaxOver:
    """MAX over n threads (the harness sync of n ranks)."""

    def __init__(self, n: int) -> None:
        self.flags: dict[int, int] = {}
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(n, timeout=20)

    def __call__(self, rank: int, flag: int) -> int:
        with self.lock:
            self.flags[rank] = flag
        self.barrier.wait()
        got = max(self.flags.values())
        self.barrier.wait()
        return got


@dataclass
class FakeRank:
    rank: int
    sync_over: MaxOver
    fail_at: int | None = None  # op index that raises on this rank
    busy_steps: int = 0  # steps until IO is done
    broke: bool = False  # the failure is the machine's, not the SUT's
    seen: list[str] = field(default_factory=list)

    def open(self) -> None:
        self.seen.append("open")

    def apply(self, op: Any) -> None:
        if self.fail_at is not None and len([s for s in self.seen if s == "op"]) == self.fail_at:
            raise RuntimeError("planted failure")
        self.seen.append("op")

    def step(self) -> None:
        self.seen.append("step")
        self.busy_steps -= 1

    def busy(self) -> bool:
        return self.busy_steps > 0

    def draining(self) -> None:
        self.seen.append("drain")

    def finish(self) -> Snapshot:
        return Snapshot(tree_digest=f"rank {self.rank}")

    def sync(self, flag: int) -> int:
        self.seen.append("sync")
        return self.sync_over(self.rank, flag)

    def machine_broke(self, e: BaseException) -> str | None:
        return "building the host pool" if self.broke else None

    def unblock(self) -> None:
        self.seen.append("unblock")

    def close(self) -> None:
        self.seen.append("close")


def _run(ranks: list[FakeRank], ops: list[Op], **kw: Any) -> list[Any]:
    out: list[Any] = [None] * len(ranks)

    def one(r: FakeRank) -> None:
        out[r.rank] = run_rank(r, ops, **kw)

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(o is not None for o in out), "a rank hung"
    return out


OPS = [Op(kind="step"), Op(kind="abort", rid="a"), Op(kind="step")]


def test_ranks_agree_then_drain_until_no_rank_is_busy() -> None:
    sync = MaxOver(2)
    ranks = [FakeRank(0, sync, busy_steps=1), FakeRank(1, sync, busy_steps=5)]
    out = _run(ranks, OPS, gated=True)
    assert [o.error for o in out] == [None, None]
    assert [o.ops_done for o in out] == [3, 3]
    assert [o.snapshot for o in out] == [Snapshot(tree_digest="rank 0"),
                                         Snapshot(tree_digest="rank 1")]
    # the busiest rank decides: both step 5 times (a MAX), then both close
    assert [r.seen.count("step") for r in ranks] == [5, 5]
    assert all(r.seen[-1] == "close" for r in ranks)


def test_a_failed_rank_stops_its_peer_at_the_next_sync() -> None:
    sync = MaxOver(2)
    ranks = [FakeRank(0, sync, fail_at=1), FakeRank(1, sync)]
    out = _run(ranks, OPS, gated=True)
    assert out[0].error.kind is ErrorKind.FAILED and "planted" in out[0].error.message
    assert out[0].ops_done == 1
    assert out[1].error.type == PeerFailed.__name__ and out[1].error.waited
    assert out[1].ops_done == 2  # it applied op 2, then met FAILED at that op's sync
    assert sync.flags[0] == FAILED
    assert all("close" in r.seen for r in ranks)
    # one sync each after the failure, no more: a rank told FAILED does not tell the others
    # again (it would wait for peers that already left, until the group's timeout)
    assert ranks[0].seen.count("sync") == ranks[1].seen.count("sync") == 2


def test_a_machine_failure_is_infrastructure_not_the_sut() -> None:
    sync = MaxOver(2)
    ranks = [FakeRank(0, sync, fail_at=0, broke=True), FakeRank(1, sync)]
    out = _run(ranks, OPS, gated=True)
    assert out[0].error.kind is ErrorKind.INFRASTRUCTURE
    assert out[0].error.where == "building the host pool"


def test_a_gated_drain_stops_after_drain_steps_even_if_busy() -> None:
    sync = MaxOver(1)
    r = FakeRank(0, sync, busy_steps=10 * DRAIN_STEPS)
    out = run_rank(r, [], gated=True)
    assert out.error is None
    assert r.seen.count("step") == DRAIN_STEPS
