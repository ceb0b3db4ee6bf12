"""The in-process mode runs the same Schedules as torchrun and logs the same decisions."""

from __future__ import annotations

import pytest

from scenarios.catalog import catalog_names, load_scenario


def _decisions(results: list[dict]) -> list:
    return [(r["rank"], r["decisions"], r["digests"], r["outcomes"]) for r in results]


@pytest.mark.cp
@pytest.mark.parametrize("scenario", catalog_names())
def test_inprocess_and_torchrun_give_identical_logs(inprocess_executor, torchrun_executor,
                                                    scenario) -> None:
    s = load_scenario(scenario).with_(layout="2x2", backend="file")
    a = inprocess_executor.run(s)
    b = torchrun_executor.run(s)
    assert _decisions(a) == _decisions(b)


@pytest.mark.parametrize("scenario", catalog_names())
def test_gated_runs_are_deterministic(inprocess_executor, scenario) -> None:
    s = load_scenario(scenario).with_(variant="tp_only_sync")
    first = _decisions(inprocess_executor.run(s))
    for _ in range(2):
        assert _decisions(inprocess_executor.run(s)) == first
