"""Outcome coverage: the shaped workload realises each prefetch class it aims for, and the `ci`
Hypothesis profile reaches every prefetch outcome class at least once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from scenarios.core.schedule import Schedule
from scenarios.generate.strategies import schedules
from scenarios.generate.workload import INTENTS, build_prefetch_schedule
from scenarios.judge.checker import check
from scenarios.judge.coverage import PREFETCH_CLASSES, Coverage, prefetch_classes


@pytest.mark.parametrize("layout", ["1x2", "2x2"])
@pytest.mark.parametrize("policy", sorted(INTENTS))
def test_each_intent_ends_in_its_class(inprocess_executor, layout: str, policy: str) -> None:
    intents = list(INTENTS[policy])
    n = len(intents)
    s = build_prefetch_schedule(layout, policy, intents, shared_len=24, batch_pages=1, mla=False,
                                picks=[[2, 3, 1, 5]] * n, fault_batch=[1] * n,
                                fault_rank=[1] * n)
    results = inprocess_executor.run(s)
    assert check(s, results).ok
    got = prefetch_classes(s, results)
    assert [got.get(f"f{k}") for k in range(n)] == intents


def test_ci_profile_reaches_every_prefetch_class(inprocess_executor) -> None:
    """Budget: the `ci` profile's 60 examples over 1x2 and 2x2 (about 5 s here)."""
    cov = Coverage()

    @settings(settings.get_profile("ci"))
    @given(s=schedules(layouts=("1x2", "2x2")))
    def run(s: Schedule) -> None:
        results = inprocess_executor.run(s)
        cov.add(s, results)
        assert check(s, results).ok

    run()
    assert cov.missing() == [], cov.table()
    assert set(cov.prefetch_shares()) == set(PREFETCH_CLASSES)


def test_soak_chunk_is_gated_and_aimed_while_a_class_lags(inprocess_executor) -> None:
    import random

    from scenarios.campaigns.soak import make_chunk
    from scenarios.generate.workload import soak_chunk

    cov = Coverage()
    rng = random.Random(0)
    s, gated = soak_chunk(rng, 0, "2x2", "fixed", "memory", make_chunk, cov)
    assert not gated  # nothing counted yet: a shaped free-running chunk
    cov.counts["prefetch"].update({"revoked": 10, "aborted": 10, "complete": 10, "partial": 10})
    s, gated = soak_chunk(rng, 1, "2x2", "fixed", "memory", make_chunk, cov)
    assert gated and cov.lagging(0.16) == ["terminated", "storage_error"]
    results = inprocess_executor.run(s)
    assert check(s, results).ok
    assert set(prefetch_classes(s, results).values()) == {"terminated", "storage_error"}


def test_soak_report_and_plot_carry_coverage(tmp_path) -> None:  # noqa: ANN001
    import json

    from scenarios.cli.main import main

    out = tmp_path / "soak"
    assert main(["soak", "--minutes", "0.1", "--seed", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert sum(rep["coverage"]["prefetch"].values()) > 0
    assert set(rep["coverage"]["prefetch_shares"]) == set(PREFETCH_CLASSES)
    assert (out / "coverage.png").stat().st_size > 0


def test_explore_summary_prints_coverage(capsys) -> None:  # noqa: ANN001
    from scenarios.cli.main import main

    assert main(["explore", "--examples", "15", "--layout", "1x2", "--mode", "inprocess"]) == 0
    out = capsys.readouterr().out
    assert "outcome coverage over 15 schedules" in out and "| prefetch |" in out


@pytest.mark.soak
@pytest.mark.parametrize("layout", ["1x2", "2x2"])
def test_one_minute_soak_keeps_every_prefetch_class_above_15_percent(tmp_path,  # noqa: ANN001
                                                                     layout: str) -> None:
    import json

    from scenarios.cli.main import main

    out = tmp_path / "soak"
    assert main(["soak", "--minutes", "1", "--layout", layout, "--out", str(out)]) == 0
    shares = json.loads((out / "report.json").read_text())["coverage"]["prefetch_shares"]
    assert min(shares.values()) >= 0.15, shares
