"""Mooncake clients outlive runs: one per (master, rank) per process; a run only leases it."""

from __future__ import annotations

import time

import pytest
import torch

from scenarios.client import storage_clients
from scenarios.generate.catalog import load_scenario
from scenarios.judge.checker import check
from scenarios.sut.reference_executor import Executor

pytestmark = pytest.mark.mooncake


def test_runs_reuse_one_client_per_rank_and_close_all_closes_them(mooncake_master: str) -> None:
    s = load_scenario("prefetch_batches").with_(layout="1x2", backend="mooncake")
    with Executor("inprocess", mooncake_master=mooncake_master) as ex:
        first = check(s, ex.run(s))
        clients = {r: storage_clients.client(mooncake_master, r) for r in (0, 1)}
        t0 = time.monotonic()
        for _ in range(3):
            assert check(s, ex.run(s)).ok
        per_run = (time.monotonic() - t0) / 3
        assert first.ok
        # the same objects served every run (no new client, none closed in between)
        assert all(storage_clients.client(mooncake_master, r) is c for r, c in clients.items())
        assert storage_clients.open_clients() >= 2
        assert per_run < 1.0, f"{per_run:.2f} s per run: clients are being reopened"
    assert storage_clients.open_clients() == 0
    assert all(c.closed for c in clients.values())


def test_lease_close_drops_the_run_keys_and_unregisters_but_keeps_the_client(
        mooncake_master: str) -> None:
    a = storage_clients.lease(mooncake_master, 90, "runA")
    b = storage_clients.lease(mooncake_master, 91, "runB")
    host = torch.arange(4096, dtype=torch.uint8)
    a.register_mem_pool_host(host)
    assert a.zero_copy
    val = host[:1024]
    assert a.batch_set(["runA_k1"], [val]) == [True]
    assert b.batch_set(["runB_k1"], [val.clone()]) == [True]
    assert a.inner.stats.zero_copy_set == 1
    a.close()
    assert not a.inner.closed and not a.inner.zero_copy
    other = storage_clients.lease(mooncake_master, 92, "probe")
    deadline = time.monotonic() + 5
    while other.exists("runA_k1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not other.exists("runA_k1")  # this run's keys are gone...
    assert other.exists("runB_k1")  # ...another run's are not
    b.close()
    other.close()
    for r in (90, 91, 92):
        storage_clients.client(mooncake_master, r).close()
