"""A rank pool over several hosts, joined by torchrun's own c10d rendezvous.

The first host runs the controller and its torchrun agent, which hosts the rendezvous store at
``--rdzv-endpoint`` (``is_host=1``). Every other host runs ``cpcheck agent --nnodes N
--rdzv-endpoint HOST:PORT``. There is no discovery of our own: the controller writes the pool's
launch config (layout, device, pool id, where workers connect back, the authkey) under
:data:`CONFIG_KEY` in that same rendezvous store, and each agent reads it there and starts
torchrun with the same worker command, so torch elastic assigns node and global ranks.

Ranks are numbered node by node (torchrun's rule: node ``k`` holds ranks ``k*n .. k*n+n-1`` for
``n`` ranks per node); :func:`node_of` names the agent a rank lives on, for diagnoses.

The store is torchrun's: unauthenticated, so the authkey published in it protects the
controller's listener only as far as the store's network does (bind to a private network).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

from scenarios.core.errors import MultiHostError

#: the key, in torchrun's rendezvous store, that holds the pool's launch config (JSON)
CONFIG_KEY = "cpcheck/pool/config"
_LAUNCH_MODULE = "scenarios.runner.launch"
_WORKER_MODULE = "scenarios.runner.worker"


@dataclass(frozen=True)
class PoolConfig:
    """What an agent needs to start its part of the pool (published by the controller)."""

    pool_id: str
    layout: str
    device: str
    collective_timeout_s: float
    nnodes: int
    nproc_per_node: int
    address: str  # host:port of the controller's listener
    authkey_hex: str
    placement: str = "torchrun"  # scenarios/runner/placement.py

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> PoolConfig:
        data = json.loads(text)
        return cls(**data)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or ValueError naming what is wrong."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint {text!r}: expected HOST:PORT with a port 1..65535")
    return host, int(port)


def node_of(rank: int, nproc_per_node: int) -> int:
    """The 0-based node (torchrun's group rank) that global `rank` runs on."""
    return rank // nproc_per_node


def describe_node(node: int, nnodes: int, nproc_per_node: int,
                  ranks: tuple[int, ...] | None = None) -> str:
    """'agent 2 of 2 (ranks 2-3)': how a diagnosis names a host (`ranks`: its layout ranks
    under a placement; default torchrun's contiguous block)."""
    lo = node * nproc_per_node
    hi = lo + nproc_per_node - 1
    where = "the first host" if node == 0 else f"agent {node + 1} of {nnodes}"
    if ranks is not None and tuple(ranks) != tuple(range(lo, hi + 1)):
        listed = ", ".join(map(str, ranks))
        return f"{where} (rank{'s' if len(ranks) > 1 else ''} {listed})"
    return f"{where} (ranks {lo}-{hi})" if hi > lo else f"{where} (rank {lo})"


def torchrun_command(python: str, cfg: PoolConfig, endpoint: str, *, is_host: bool) -> list[str]:
    """The torchrun command every host runs for one pool (the controller's host hosts the
    store); the worker arguments are the single-host pool's."""
    host, _ = parse_endpoint(endpoint)
    cmd = [python, "-m", _LAUNCH_MODULE, f"--nnodes={cfg.nnodes}",
           f"--nproc-per-node={cfg.nproc_per_node}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={endpoint}", f"--rdzv-id=cpcheck-{cfg.pool_id}",
           f"--rdzv-conf=is_host={1 if is_host else 0}", "--max-restarts=0",
           "--monitor-interval=0.1"]
    if host in ("127.0.0.1", "localhost"):
        cmd.append("--local-addr=127.0.0.1")  # one machine as several hosts (tests)
    return [*cmd, "-m", _WORKER_MODULE, f"--pool-id={cfg.pool_id}", f"--layout={cfg.layout}",
            f"--device={cfg.device}", f"--collective-timeout-s={cfg.collective_timeout_s}",
            f"--placement={cfg.placement}"]


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections there (checked with a plain socket first, so
    waiting for the store does not fill the log with TCPStore's retry warnings)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _client(endpoint: str, timeout_s: float) -> object:
    """A client of the rendezvous store (raises if nobody hosts it within `timeout_s`)."""
    from torch.distributed import TCPStore

    host, port = parse_endpoint(endpoint)
    if not _listening(host, port):
        raise ConnectionRefusedError(f"nothing listens on {endpoint} yet")
    return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                    wait_for_workers=False)


def publish_config(endpoint: str, cfg: PoolConfig, deadline: float,
                   alive: Callable[[], bool]) -> None:
    """Write `cfg` into the rendezvous store once the first host's torchrun hosts it."""
    last: Exception | None = None
    while time.monotonic() < deadline and alive():
        try:
            store = _client(endpoint, min(2.0, max(deadline - time.monotonic(), 0.1)))
            store.set(CONFIG_KEY, cfg.to_json())  # type: ignore[attr-defined]
            return
        except Exception as e:  # the store is not up yet: torchrun is still starting
            last = e
            time.sleep(0.1)
    raise MultiHostError(f"could not publish the pool config at {endpoint}: "
                         f"{'torchrun exited' if not alive() else last}")


def fetch_config(endpoint: str, timeout_s: float, skip_pool: str = "") -> PoolConfig:
    """Wait (up to `timeout_s`) for the first host's store and a config of a pool other than
    `skip_pool` (the one this agent last served), and return it."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            store = _client(endpoint, min(2.0, max(deadline - time.monotonic(), 0.1)))
            if store.check([CONFIG_KEY]):  # type: ignore[attr-defined]
                cfg = PoolConfig.from_json(store.get(CONFIG_KEY))  # type: ignore[attr-defined]
                if cfg.pool_id != skip_pool:
                    return cfg
        except Exception as e:  # no first host yet, or it is restarting its pool
            last = e
        time.sleep(0.2)
    raise MultiHostError(f"no pool to join at {endpoint} within {timeout_s:g} s"
                         f"{f' ({last})' if last else ''}")


def agent_env(cfg: PoolConfig, endpoint: str) -> dict[str, str]:
    """The environment of an agent's torchrun: where and how workers connect back."""
    from scenarios.core.config import REPO_ROOT
    from scenarios.runner.worker import ENV_ADDRESS, ENV_AUTHKEY

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    host, _ = parse_endpoint(endpoint)
    if host in ("127.0.0.1", "localhost") and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env.setdefault("OMP_NUM_THREADS", "1")
    env[ENV_ADDRESS] = cfg.address
    env[ENV_AUTHKEY] = cfg.authkey_hex
    return env


def run_agent(nnodes: int, endpoint: str, *, wait_s: float = 600.0, once: bool = False,
              python: str = sys.executable, log: Callable[[str], None] = print) -> int:
    """`cpcheck agent`: serve pool after pool of the first host until stopped (or `once`).

    Each pool is one torchrun; when it ends (the controller closed or restarted its pool, or a
    host left), the agent waits for the next config in the store and joins again."""
    served = ""
    while True:
        cfg = fetch_config(endpoint, wait_s, skip_pool=served)
        if cfg.nnodes != nnodes:
            raise MultiHostError(f"the pool at {endpoint} spans {cfg.nnodes} hosts, this agent "
                                 f"was started with --nnodes {nnodes}")
        served = cfg.pool_id
        log(f"cpcheck agent: joining pool {cfg.pool_id} (layout {cfg.layout}, "
            f"{cfg.nproc_per_node} rank(s) here) at {endpoint}")
        # in the agent's process group (Ctrl-C at its terminal reaches torchrun); torch elastic
        # starts the workers in sessions of their own: stopping a whole agent means its tree
        proc = subprocess.Popen(torchrun_command(python, cfg, endpoint, is_host=False),
                                stdin=subprocess.DEVNULL, env=agent_env(cfg, endpoint))
        try:
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        log(f"cpcheck agent: pool {cfg.pool_id} ended (torchrun exit {code})")
        if once:
            return code


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun and its workers, then SIGKILL whatever is left."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5.0)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5.0)


# -- agents on this machine: what the nemesis signals and the soak restarts ---------------------


@dataclass(frozen=True)
class LocalAgent:
    """One host's agent found running on this machine: its processes, root first (the
    `cpcheck agent` loop when there is one, then its torchrun, then the workers), and how to
    start it again (its command line, folder and environment)."""

    node: int
    pids: tuple[int, ...]
    argv: tuple[str, ...] = ()
    cwd: str = ""
    env: tuple[tuple[str, str], ...] = ()

    @property
    def restartable(self) -> bool:
        return bool(self.argv)


def _is_agent_loop(cmdline: list[str]) -> bool:
    return "agent" in cmdline and any(a.startswith("--rdzv-endpoint") for a in cmdline)


def find_local_agent(node: int, worker_pids: list[int], pool_id: str) -> LocalAgent | None:
    """The agent of `node` if its workers (`worker_pids`, as they said in their hellos) run on
    this machine: a pid is taken as local only when that process carries the pool's id."""
    import psutil

    token = f"--pool-id={pool_id}"
    workers, parents = [], set()
    for pid in worker_pids:
        try:
            proc = psutil.Process(pid)
            if token not in proc.cmdline():
                return None  # another host's pid, or reused: not ours to signal
            workers.append(pid)
            parents.add(proc.ppid())
        except psutil.Error:
            return None
    if len(parents) != 1:
        return None
    try:
        torchrun = psutil.Process(parents.pop())
        loop = torchrun.parent()
        if loop is not None and _is_agent_loop(loop.cmdline()):
            return LocalAgent(node, (loop.pid, torchrun.pid, *workers), tuple(loop.cmdline()),
                              loop.cwd(), tuple(sorted(loop.environ().items())))
        return LocalAgent(node, (torchrun.pid, *workers))
    except psutil.Error:
        return None


def restart_agent(agent: LocalAgent, log_path: str | None = None) -> subprocess.Popen:
    """Start a lost agent again as it was started (its own session: the caller stops it)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(list(agent.argv), cwd=agent.cwd or None, env=dict(agent.env),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def stop_agent_process(proc: subprocess.Popen) -> None:
    """Stop an agent this harness restarted, with its torchrun and workers."""
    _stop(proc)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
