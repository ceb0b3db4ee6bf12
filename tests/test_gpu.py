"""On a GPU runner the multi-rank suite uses the GPU with no extra flags."""

from __future__ import annotations

import pytest

from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check

pytestmark = [pytest.mark.gpu, pytest.mark.cp]


@pytest.mark.parametrize("mode", ["torchrun", "inprocess"])
def test_device_pool_on_cuda_pinned_host_cuda_event_acks(torchrun_executor, inprocess_executor,
                                                        mode: str) -> None:
    ex = torchrun_executor if mode == "torchrun" else inprocess_executor
    s = load_scenario("prefetch_batches").with_(layout="2x2")
    results = ex.run(s)
    assert check(s, results).ok
    for r in results:
        snap = r.snapshot
        assert snap is not None and snap.device.startswith("cuda"), snap
        assert snap.host_pinned and snap.cuda_event_acks, snap
