"""What sglang-0.5.20 models at the drain that older profiles do not (read from the 0.5.20
wheel; REMAINING_DIFFERENCES in scenarios/judge/differential.py no longer names them):

- 0.5.18+ revoke at the drain below the cache's threshold as configured, so at threshold 0 a
  prefetch with no storage hit is kept and inserted with 0 tokens (`zero_hit_insert_0_5_20`);
- 0.5.16+ allocate a prefetch's host pages at the drain for the agreed hit only: the pages the
  reference takes past the hit never reach the drain's host-release queue;
- 0.5.17+ (PP 1) read the drain's queue sizes in one MIN with the write / load acks, before
  `writing_check` starts the storage backups of the writes it acks: those are acked a drain
  later than when the drain read its queues after `writing_check`.
"""

from __future__ import annotations

from typing import Any

import pytest

from scenarios.generate.catalog import load_scenario
from scenarios.judge.differential import REMAINING_DIFFERENCES, decision_rows


def _rows(inprocess_executor: Any, scenario: str, protocol: str) -> list[tuple[str, str, str]]:
    s = load_scenario(scenario).with_(protocol=protocol)
    results = inprocess_executor.run(s)
    assert all(r.error is None for r in results), [r.error for r in results]
    return decision_rows(results[0])


def _drains(rows: list[tuple[str, str, str]]) -> list[str]:
    return [o for k, _, o in rows if k == "drain"]


def test_closed_differences_are_no_longer_remaining() -> None:
    assert "zero_hit_insert_0_5_20" not in REMAINING_DIFFERENCES


@pytest.mark.parametrize(("protocol", "first_drain", "inserts"), [
    ("sglang-0.5.14", "revoke 2, backup acks 0, release 8", []),
    ("sglang-0.5.20", "revoke 0, backup acks 0, release 0",
     [("prefetch_done", "a", "insert 0 tokens"), ("prefetch_done", "b", "insert 0 tokens")]),
])
def test_a_prefetch_with_no_hit_at_threshold_0(inprocess_executor: Any, protocol: str,
                                                first_drain: str, inserts: list) -> None:
    """write_acks: two 19-token requests, storage empty, threshold 0. To 0.5.17 the controller
    revokes below its threshold clamped to one page and the pages go back through the drain
    (8 pages); from 0.5.18 nothing is revoked and nothing was allocated past the hit."""
    rows = _rows(inprocess_executor, "write_acks", protocol)
    assert _drains(rows)[0] == first_drain
    assert [r for r in rows if r[0] == "prefetch_done"] == inserts


@pytest.mark.parametrize(("protocol", "release"), [("sglang-0.5.14", 4), ("sglang-0.5.20", 0)])
def test_a_revoked_prefetch_queues_no_host_page_from_0_5_16(inprocess_executor: Any,
                                                            protocol: str, release: int) -> None:
    """revoke: threshold 8 tokens, no stored page: revoked on every profile; its 4 pages go
    through the release queue only where the prefetch allocated them up front."""
    first = _drains(_rows(inprocess_executor, "revoke", protocol))[0]
    assert first == f"revoke 1, backup acks 0, release {release}"


@pytest.mark.parametrize(("protocol", "late"), [("sglang-0.5.14", 0), ("sglang-0.5.20", 1)])
def test_a_backup_started_by_this_steps_write_acks(inprocess_executor: Any, protocol: str,
                                                    late: int) -> None:
    """write_acks: the step that acks the 2 writes starts their 2 backups, which the Schedule
    lets finish at once. Read after `writing_check`, the same step's drain acks them; read in
    the step's one MIN before it (0.5.17+), the next step's drain does."""
    rows = _rows(inprocess_executor, "write_acks", protocol)
    step = next(i for i, r in enumerate(rows) if r == ("writing_check", "", "ack 2 writes"))
    drains = [o for k, _, o in rows[step:] if k == "drain"]
    acked = next(i for i, o in enumerate(drains) if "backup acks 2" in o)
    assert acked == late, drains
