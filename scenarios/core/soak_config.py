"""What a soak was asked to do, as one plain value built by the command line.

Nothing below the CLI reads an argparse namespace: the soak, its report and its verdict line
read this. `cmd`, `json` and `verbose` carry the output conventions of every subcommand
(`scenarios.cli.conventions.human` / `emit_json` read them by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: how far past its budget a soak with --min-runs may go to judge that many runs
MIN_RUNS_SLACK = 20


@dataclass(frozen=True)
class SoakConfig:
    layout: str = "1x2"
    backend: str = "memory"
    minutes: float = 1.0
    #: judged runs to reach even past the budget (at most MIN_RUNS_SLACK x the budget)
    min_runs: int = 0
    variant: str = "fixed"
    faults: str = ""
    seed: int | None = None
    mode: str = "inprocess"
    out: Path = Path("cpcheck-out/soak")
    mooncake_master: str = ""
    timeout: float = 10.0
    device: str = "auto"
    protocol_changes: dict[str, Any] = field(default_factory=dict)
    #: the system under test: "reference" or "sglang==VERSION" (scenarios/core/suts.py)
    sut: str = "reference"
    #: `--shard I/N` of a nightly spread over runners (campaigns/shard.py), or None
    shard: dict[str, Any] | None = None
    #: the rank pool over several hosts (`--nnodes`, `--rdzv-endpoint`, `--placement`), or {} for one host
    pool_options: dict[str, Any] = field(default_factory=dict)
    json: bool = False
    verbose: bool = False
    #: the command line, for the report's provenance
    argv: tuple[str, ...] = ()
    cmd: str = "soak"

    @property
    def budget_s(self) -> float:
        return self.minutes * 60.0

    def goes_on(self, elapsed_s: float, judged_runs: int) -> bool:
        """Within the budget; or past it while fewer than `min_runs` runs were judged, up to
        MIN_RUNS_SLACK times the budget (a soak whose every run is cut still ends)."""
        if elapsed_s < self.budget_s:
            return True
        return judged_runs < self.min_runs and elapsed_s < self.budget_s * MIN_RUNS_SLACK
