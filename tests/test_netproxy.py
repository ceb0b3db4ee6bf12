"""Network faults between hosts: the per-host TCP proxy and the nemesis kinds that use it.

This kernel has no netem and no iptables; the proxy stands between one host's workers and the
controller. The fast cases use an echo server; the pool and the soak over two agents run in
`-m cp` / the nightly.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scenarios.cli.main import main
from scenarios.core.errors import RankDiedError
from scenarios.nemesis.faults import Nemesis, Window
from scenarios.runner.netproxy import REACH, TcpProxy
from scenarios.runner.torchrun_pool import RankPool
from tests.test_multihost_pool import _agent, _free_port, _stop


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[:2]
    srv.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def _round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    t = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        got += chunk
    assert got == payload
    return time.monotonic() - t


def test_the_proxy_forwards_adds_its_delay_each_way_and_drops(echo) -> None:
    proxy = TcpProxy(echo)
    try:
        with socket.create_connection(proxy.address, timeout=10) as s:
            fast = _round_trip(s)
            proxy.delay_s = 0.15
            slow = _round_trip(s, b"x" * 10_000)
            assert slow >= 0.3 > fast, (fast, slow)  # 0.15 s out and 0.15 s back
            proxy.delay_s = 0.0
            assert _round_trip(s) < 0.3
            assert proxy.drop() == 1
            s.settimeout(5)
            assert s.recv(10) == b""  # the worker's end sees EOF at once
    finally:
        proxy.close()


def test_net_latency_sets_the_delay_for_its_window_and_net_drop_cuts(echo) -> None:
    proxy = TcpProxy(echo)
    try:
        nem = Nemesis(kinds=("net_drop", "net_latency"), seed=1, nnodes=2)
        nem.for_torchrun()
        nem.plan = [Window("net_latency", 1, 0.05, 0.4, delay_s=0.03)]
        nem.arm([], links={1: proxy})
        time.sleep(0.2)
        assert proxy.delay_s == 0.03
        time.sleep(0.4)
        assert proxy.delay_s == 0.0
        nem.end_run()
        assert nem.explain() is None and nem.counts()["net_latency"] == 1
        with socket.create_connection(proxy.address, timeout=10) as s:
            _round_trip(s)
            nem.plan = [Window("net_drop", 1, 0.05, 1e9)]
            nem.arm([], links={1: proxy})
            s.settimeout(5)
            assert s.recv(10) == b""
            nem.end_run()
        assert "dropped the connections of the agent of node 1" in (nem.explain() or "")
    finally:
        proxy.close()


def test_a_host_without_a_proxy_is_out_of_reach_and_said_so() -> None:
    nem = Nemesis(kinds=("net_drop",), seed=1, nnodes=2)
    nem.for_torchrun()
    nem.plan = [Window("net_drop", 1, 0.0, 1e9)]
    nem.arm([], links={})
    time.sleep(0.2)
    nem.end_run()
    assert nem.explain() is None and "out of reach" in nem.events[0].detail


def test_network_faults_say_what_they_reach_and_need_hosts(tmp_path, capsys) -> None:
    assert "gloo" in REACH and "not reached" in REACH
    assert main(["soak", "--minutes", "0.02", "--faults", "net_latency",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nnodes N > 1" in err[0], err


@pytest.mark.cp
@pytest.mark.soak  # two agents: `-m cp` and the nightly
def test_a_pool_over_two_agents_through_proxies_lags_and_loses_the_host() -> None:
    ep = f"127.0.0.1:{_free_port()}"
    agent = _agent(ep)
    try:
        pool = RankPool("1x2", nnodes=2, rdzv_endpoint=ep, start_timeout_s=90,
                        proxy_hosts=True)
        with pool:
            assert set(pool.links) == {1} and pool.links[1].connections == 2  # job + control
            pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=30)
            pool.links[1].delay_s = 0.25
            t = time.monotonic()
            pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=30)
            assert time.monotonic() - t >= 0.5  # the job out and its result back
            pool.links[1].delay_s = 0.0
            threading.Timer(0.5, pool.links[1].drop).start()
            with pytest.raises(RankDiedError) as e:
                pool.run("scenarios.runner.jobs_builtin:sleep_forever_on_rank", {"rank": 1},
                         timeout_s=60)
            assert e.value.node == 1 and "agent 2 of 2" in str(e.value)
    finally:
        _stop(agent)


@pytest.mark.cp
@pytest.mark.soak
def test_a_soak_with_network_faults_goes_on_past_a_dropped_host(tmp_path: Path) -> None:
    ep = f"127.0.0.1:{_free_port()}"
    agent = _agent(ep)
    out = tmp_path / "soak"
    try:
        rc = main(["soak", "--mode", "torchrun", "--layout", "1x2", "--nnodes", "2",
                   "--rdzv-endpoint", ep, "--minutes", "1.5", "--seed", "3",
                   "--faults", "net_latency,net_drop", "--out", str(out)])
    finally:
        _stop(agent)
    rep = json.loads((out / "latest" / "report.json").read_text())
    assert rc == 0, rep["verdict"]
    assert rep["faults"]["net_latency"] >= 1 and rep["faults"]["net_drop"] >= 1
    assert rep["lost_runs"] >= 1 and rep["runs"] > rep["unknown_runs"][0]["run"]
