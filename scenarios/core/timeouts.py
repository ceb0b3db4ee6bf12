"""Every wait of a run, derived from the one `--timeout` a user sets.

`--timeout` is how long a rank waits for its peers at one agreement. Everything else a run
waits on is a fixed multiple of it, here and only here, so a slow machine is answered by
raising `--timeout`, never by a constant somewhere below: the harness's own agreement wait
fires before a collective's (which names the rank that waited), a collective's before a whole
job's, and a whole job's before the pool's first SGLang job (imports, parallel state, a cache).
"""

from __future__ import annotations

from dataclasses import dataclass

#: what `--timeout` defaults to (seconds)
DEFAULT_AGREEMENT_S = 10.0
#: ... for the SGLang-only campaigns (diff, matrix): SGLang's first runs on a cold pool are slow
SGLANG_AGREEMENT_S = 20.0


@dataclass(frozen=True)
class Timeouts:
    agreement_s: float = DEFAULT_AGREEMENT_S

    @property
    def collective_s(self) -> float:
        """A pool's process-group timeout: past the harness's own agreement wait, so a hang is
        named by the harness (which rank waited on what) before gloo gives up."""
        return self.agreement_s * 3

    @property
    def run_s(self) -> float:
        """One whole run (every rank's job) on threads or a pool."""
        return self.agreement_s * 6 + 60

    @property
    def sglang_setup_s(self) -> float:
        """An SGLang pool's first job: SGLang's imports, its parallel state and a first cache."""
        return self.agreement_s * 12 + 120

    @property
    def sglang_group_s(self) -> float:
        """The wait of a collective SGLang's own code issues on a harness group."""
        return max(1.5 * self.agreement_s, 30.0)
