"""Job functions that torchrun workers run (see torchrun_pool.RankPool.run)."""

from __future__ import annotations

import dataclasses
from typing import Any

from reference.api import TorchCollectives
from scenarios.core.records import RankResult
from scenarios.core.schedule import Schedule
from scenarios.sut.reference_rank import RunEnv, execute


def run_schedule(ctx: Any, payload: dict) -> RankResult:
    """Execute one Schedule on this rank; the gloo sync groups persist across runs."""
    coll = ctx.state.get("collectives")
    if coll is None:
        coll = ctx.state["collectives"] = TorchCollectives(payload["collective_timeout_s"])
    s = Schedule.model_validate_json(payload["schedule"])
    env = RunEnv(
        rank=ctx.rank,
        run_id=payload["run_id"],
        device=str(ctx.device),
        storage_root=payload.get("storage_root", ""),
        mooncake_master=payload.get("mooncake_master", ""),
        gated=payload.get("gated", True),
        agree_timeout_s=payload["collective_timeout_s"],
    )
    ctx.status.set(f"running schedule '{s.name}' ({len(s.ops)} ops)")
    from scenarios.nemesis.faults import Nemesis

    nem = Nemesis.from_wire(payload.get("nemesis"))  # the faults this worker applies itself
    result = execute(s, env, coll, nem)
    if nem is not None:
        result = dataclasses.replace(result, nemesis_injected=dict(nem.injected))
    return result
