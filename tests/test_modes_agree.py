"""The in-process mode runs the same Schedules as torchrun and logs the same decisions."""

from __future__ import annotations

import pytest

from reference.api import PROFILES
from scenarios.generate.catalog import catalog_names, load_scenario


def _decisions(results: list) -> list:
    return [(r.rank, r.decisions, r.digests, r.outcomes) for r in results]


@pytest.mark.cp
@pytest.mark.parametrize("protocol", list(PROFILES))
@pytest.mark.parametrize("scenario", catalog_names())
def test_inprocess_and_torchrun_give_identical_logs(inprocess_executor, torchrun_executor,
                                                    scenario, protocol) -> None:
    s = load_scenario(scenario).with_(layout="2x2", backend="file", protocol=protocol)
    a = inprocess_executor.run(s)
    b = torchrun_executor.run(s)
    assert _decisions(a) == _decisions(b)


@pytest.mark.cp
@pytest.mark.parametrize("protocol", list(PROFILES))
def test_modes_agree_without_dp_attention_and_with_pp(inprocess_executor, torchrun_executor,
                                                      protocol) -> None:
    """Both configurations, and PP (0.5.13's send/recv forward), log alike in both modes."""
    for layout, dp in (("2x2", False), ("2x1x2", True)):
        s = load_scenario("prefetch_partial").with_(layout=layout, backend="file",
                                                    protocol=protocol, dp_attention=dp)
        assert _decisions(inprocess_executor.run(s)) == _decisions(torchrun_executor.run(s))


@pytest.mark.parametrize("scenario", catalog_names())
def test_gated_runs_are_deterministic(inprocess_executor, scenario) -> None:
    s = load_scenario(scenario).with_(variant="tp_only_sync")
    first = _decisions(inprocess_executor.run(s))
    for _ in range(2):
        assert _decisions(inprocess_executor.run(s)) == first
