"""The reference on a real Mooncake master: keys checked in the store, faults, bad addresses."""

from __future__ import annotations

import pytest

from scenarios.cli.main import main
from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check
from scenarios.sut.reference_executor import Executor

pytestmark = pytest.mark.mooncake


@pytest.fixture(scope="module")
def mooncake_torchrun(mooncake_master: str):
    with Executor("torchrun", timeout_s=10.0, mooncake_master=mooncake_master) as ex:
        yield ex


def _union(results: list[dict]) -> dict[tuple[str, str], set[str]]:
    pages: dict[tuple[str, str], set[str]] = {}
    for r in results:
        for key in r.stored:
            base, part = key.rsplit("_", 1)
            pages.setdefault((base.split("_")[1][:64], part), set()).add(key)
    return pages


@pytest.mark.cp
@pytest.mark.parametrize("scenario", ["write_acks", "prefetch_batches", "prefetch_error"])
def test_fixed_agrees_on_2x2_with_mooncake(mooncake_torchrun, scenario: str) -> None:
    s = load_scenario(scenario).with_(layout="2x2", backend="mooncake")
    results = mooncake_torchrun.run(s)
    verdict = check(s, results)
    assert verdict.ok, verdict.summary()
    # every page each rank backed up is in the master, under the same key on both CP peers
    by_rank = {r.rank: set(r.stored) for r in results}
    assert all(by_rank.values()), "no rank confirmed a stored key"
    assert by_rank[0] == by_rank[2] and by_rank[1] == by_rank[3]  # CP peers (tp 0, tp 1)
    assert by_rank[0] != by_rank[1]  # MHA: one copy per TP rank


@pytest.mark.cp
def test_cp_rank_in_key_leaves_cp_split_duplicates_in_the_store(mooncake_torchrun) -> None:
    s = load_scenario("write_acks").with_(layout="2x2", backend="mooncake",
                                          variant="cp_rank_in_key")
    results = mooncake_torchrun.run(s)
    verdict = check(s, results)
    assert verdict.invariant == "keys"
    messages = " ".join(m for _, m in verdict.failures)
    assert "CP-split duplicates" in messages and "CP peers 0 and 2" in messages
    assert max(len(v) for v in _union(results).values()) == 4  # 2 TP x 2 CP copies


@pytest.mark.cp
@pytest.mark.parametrize(("mla", "copies"), [(True, 1), (False, 2)])
def test_mla_stores_one_copy_mha_one_per_tp_rank(mooncake_torchrun, mla: bool, copies: int) -> None:
    s = load_scenario("write_acks").with_(layout="2x2", backend="mooncake")
    s = s.with_(cache={**s.cache.model_dump(), "mla": mla})
    results = mooncake_torchrun.run(s)
    assert check(s, results).ok
    counts = {len(v) for v in _union(results).values()}
    assert counts == {copies}


def test_fixed_agrees_inprocess_with_a_read_failing_on_one_rank(mooncake_master: str) -> None:
    s = load_scenario("prefetch_error").with_(backend="mooncake")
    with Executor("inprocess", timeout_s=10.0, mooncake_master=mooncake_master) as ex:
        verdict = check(s, ex.run(s))
    assert verdict.ok, verdict.summary()


def test_unreachable_master_is_one_clear_line(capsys) -> None:
    rc = main(["run", "write_acks", "--backend", "mooncake", "--mooncake-master",
               "127.0.0.1:1", "--mode", "inprocess"])
    err = capsys.readouterr().err.strip()
    assert rc == 125 and len(err.splitlines()) == 1 and "unreachable" in err, err


def test_master_restart_mid_soak_keeps_agreement(tmp_path, capsys) -> None:
    """Lost pages become misses on every rank alike; nothing hangs."""
    rc = main(["soak", "--backend", "mooncake", "--minutes", "0.25", "--faults",
               "master_restart", "--out", str(tmp_path), "--seed", "3"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["faults"].get("master_restart", 0) >= 1
    assert report["runs"] >= 1
