"""Every service cpcheck starts listens on 127.0.0.1 only (issue 23): torchrun's stores, gloo,
the pool's acceptor, the Mooncake master, and (known exception, named below) the Mooncake
client's transfer engine. Each check reads the LISTEN sockets of the processes themselves
(psutil), during a real run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil
import pytest

from scenarios.generate.catalog import load_scenario
from tests.subprocess_env import REPO, child_env

LOOPBACK = {"127.0.0.1", "::1"}

MOONCAKE_NO_KNOB = (
    "Mooncake 0.3.13's transfer engine (in every Mooncake client, so in every worker) listens "
    "on all interfaces: its P2P handshake port on 0.0.0.0 and its TcpTransport data port on "
    "[::]; MC_TCP_BIND_ADDRESS only sets the address it advertises, and the library has no "
    "bind-address setting"
)


def _listening(procs: list[psutil.Process]) -> dict[tuple[str, int], str]:
    """(ip, port) -> the process (pid and command) listening on it."""
    out = {}
    for p in procs:
        try:
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN:
                    out[(c.laddr.ip, c.laddr.port)] = f"{p.pid} {' '.join(p.cmdline()[:4])}"
        except psutil.Error:
            pass  # gone between the listing and the look
    return out


class _Sampler(threading.Thread):
    """Every listener of this process tree, sampled every 0.1 s while a run is in flight."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[tuple[str, int], str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            self.seen.update(_listening([me, *me.children(recursive=True)]))
            self._halt.wait(0.1)

    def __enter__(self) -> _Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join()


def _not_loopback(seen: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
    return {k: v for k, v in seen.items() if k[0] not in LOOPBACK}


def test_torchs_own_store_server_listens_everywhere_and_ours_on_loopback() -> None:
    """Why the launcher binds torchrun's stores itself: torch's TCPStore server listens on
    [::] whatever host it is given; through `bind_stores_to` it listens on 127.0.0.1."""
    code = (
        "import datetime, psutil, sys, torch.distributed as dist\n"
        "from scenarios.runner.launch import bind_stores_to\n"
        "if sys.argv[1] == 'bound': bind_stores_to('127.0.0.1')\n"
        "s = dist.TCPStore('127.0.0.1', 0, 1, True, datetime.timedelta(seconds=5),"
        " wait_for_workers=False, multi_tenant=True)\n"
        "s.set('k', 'v'); assert s.get('k') == b'v'\n"
        "print(sorted({c.laddr.ip for c in psutil.Process().net_connections('inet')"
        " if c.status == 'LISTEN'}))\n")
    ips = {}
    for how in ("torch", "bound"):
        r = subprocess.run([sys.executable, "-c", code, how], cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        ips[how] = r.stdout.strip().splitlines()[-1]
    assert ips["bound"] == "['127.0.0.1']"
    assert ips["torch"] != ips["bound"]  # the plant: without the binding it listens wider


@pytest.mark.cp
def test_a_torchrun_pool_listens_on_loopback_only() -> None:
    """torchrun's rendezvous and worker stores (the launcher), gloo (the workers), the pool's
    acceptor (this process): every one of them on 127.0.0.1, during a real 1x2 run."""
    from scenarios.sut.reference_executor import Executor

    s = load_scenario("write_acks")
    with _Sampler() as sampler, Executor("torchrun", timeout_s=30.0) as ex:
        ex.run(s, gated=True)
        time.sleep(0.3)  # one more sample while the pool is up
    seen = sampler.seen
    roles = {"launcher": "scenarios.runner.launch", "worker": "scenarios.runner.worker"}
    for role, module in roles.items():
        assert any(module in who for who in seen.values()), f"no {role} listener seen: {seen}"
    assert any(str(psutil.Process().pid) == who.split()[0] for who in seen.values()), seen
    assert not _not_loopback(seen), _not_loopback(seen)


@pytest.mark.mooncake
def test_the_mooncake_master_listens_on_loopback_only() -> None:
    from scenarios.nemesis.mooncake_master import MooncakeMaster, mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)
    with MooncakeMaster() as m:
        seen = _listening([psutil.Process(m.pid)])
    assert len(seen) >= 2 and not _not_loopback(seen), seen  # RPC and metrics ports


@pytest.mark.mooncake
@pytest.mark.xfail(strict=True, reason=MOONCAKE_NO_KNOB)
def test_a_mooncake_clients_transfer_engine_listens_on_loopback_only() -> None:
    from reference.api import MooncakeConfig, MooncakeStorage
    from scenarios.nemesis.mooncake_master import MooncakeMaster, mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)
    me = psutil.Process()
    with MooncakeMaster() as m:
        before = _listening([me])
        client = MooncakeStorage(MooncakeConfig(master_address=m.address))
        try:
            new = {k: v for k, v in _listening([me]).items() if k not in before}
        finally:
            client.close()
    assert new, "the client opened no listener (the check would prove nothing)"
    assert not _not_loopback(new), f"{MOONCAKE_NO_KNOB}: {sorted(_not_loopback(new))}"
