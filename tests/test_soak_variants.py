"""A free-running soak finds each known-bad variant by itself, and its replay reproduces it."""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.cli.main import main

FAST = ["cp_rank_in_key", "leak_on_revoke", "misaligned_batch", "tp_only_sync",
        "writing_check_local_skip"]
SLOW = ["insert_local_completed", "skip_ack_on_error"]


def _soak_then_replay(variant: str, out: Path, minutes: str) -> None:
    rc = main(["soak", "--variant", variant, "--minutes", minutes, "--faults", "storage_errors",
               "--out", str(out), "--seed", "0"])
    assert rc == 1, f"the soak did not find {variant}"
    replays = sorted(out.glob("replay-*.json"))
    assert replays, "no replay file written"
    assert main(["replay", str(replays[0]), "--mode", "inprocess"]) == 1


@pytest.mark.parametrize("variant", FAST)
def test_soak_finds_variant_and_replay_reproduces(tmp_path: Path, variant: str) -> None:
    _soak_then_replay(variant, tmp_path, "0.5")


@pytest.mark.soak
@pytest.mark.parametrize("variant", SLOW)
def test_soak_finds_slow_variant_and_replay_reproduces(tmp_path: Path, variant: str) -> None:
    _soak_then_replay(variant, tmp_path, "2")
