"""Self-nemesis (issue 23): cpcheck's own workers and its own Mooncake master killed at seeded
random moments of seeded random phases (start-up, mid-run, during confirmation, while writing
the report). Each time the verdict is agree, a reproducible diverge or a diagnosed unknown
(125 naming what died); no process, listening port or temp directory is left; and nothing found
is lost (a divergence's replay file or, unconfirmed, its unknown-*.json).

Budget: the default suite runs one case (`cp`: a worker SIGKILLed mid-run of a 1x2 torchrun
soak, 56 s on a 2-core box shared by eight sessions); the `soak` marker runs the other 16
(9 torchrun soaks on 2x2, 7 Mooncake soaks; about 15 minutes there).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.subprocess_env import REPO, child_env

#: the phases a kill lands in, as report.json names them (`phase`) or what the run reached
PHASES = ("start-up", "mid-run", "confirming")


def _load_factor() -> float:
    return max(1.0, os.getloadavg()[0] / (len(os.sched_getaffinity(0)) or 1))


@dataclass
class Watched:
    """A soak subprocess and everything it started (pids with their start times, ports)."""

    proc: subprocess.Popen
    out: Path
    tmpdir: Path
    pids: dict[int, float] = field(default_factory=dict)
    ports: set[int] = field(default_factory=set)

    def report(self) -> dict:
        try:
            return json.loads((self.out / "latest" / "report.json").read_text())
        except (OSError, ValueError):
            return {}

    def look(self) -> list[psutil.Process]:
        """Record every process below the soak (torchrun pools are their own sessions, but
        still its descendants) and the ports they listen on."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        for p in procs:
            try:
                self.pids.setdefault(p.pid, p.create_time())
                self.ports.update(c.laddr.port for c in p.net_connections("inet")
                                  if c.status == psutil.CONN_LISTEN)
            except psutil.Error:
                pass
        return procs

    def find(self, module: str) -> list[psutil.Process]:
        found = []
        for p in self.look():
            try:
                if any(module in a for a in p.cmdline()):
                    found.append(p)
            except psutil.Error:
                pass
        return found


def _start(tmp_path: Path, *argv: str) -> Watched:
    out, tmpdir = tmp_path / "soak", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "scenarios.cli", "soak", *argv, "--out",
                             str(out), "--json"], cwd=REPO,
                            env=child_env(TMPDIR=str(tmpdir)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return Watched(proc, out, tmpdir)


def _wait(w: Watched, pred, limit_s: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit_s * _load_factor()
    while time.monotonic() < deadline:
        w.look()
        if pred():
            return
        if w.proc.poll() is not None:
            return  # it ended before the moment came: the checks still apply
        time.sleep(0.02)
    w.proc.kill()
    raise AssertionError(f"the moment never came within {limit_s} s: {w.proc.communicate()}")


def _kill(w: Watched, module: str, rng: random.Random) -> str:
    """SIGKILL one process running `module` (a seeded pick); what was killed, or ""."""
    procs = w.find(module)
    if not procs:
        return ""
    victim = rng.choice(sorted(procs, key=lambda p: p.pid))
    with_pid = f"{module} pid {victim.pid}"
    try:
        victim.send_signal(signal.SIGKILL)
    except psutil.Error:
        return ""
    return with_pid


def _finish(w: Watched, limit_s: float = 240) -> tuple[int, dict, str]:
    try:
        stdout, stderr = w.proc.communicate(timeout=limit_s * _load_factor())
    except subprocess.TimeoutExpired:
        w.proc.kill()
        stdout, stderr = w.proc.communicate()
        raise AssertionError(f"the soak hung after the kill: {stdout}{stderr}") from None
    return w.proc.returncode, w.report(), stdout + stderr


def _nothing_left(w: Watched) -> None:
    """No process the soak started, no port they listened on, no temp directory."""
    deadline = time.monotonic() + 15 * _load_factor()
    alive: list[int] = []
    while time.monotonic() < deadline:
        alive = []
        for pid, created in w.pids.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, f"processes left behind: {alive}"
    # a port still listening is ours when no other process holds it (a freed ephemeral port is
    # soon taken by a neighbour on a shared host: that one is not left behind)
    held = {c.laddr.port: c.pid for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in w.ports}
    ours = {port: pid for port, pid in held.items() if pid is None or pid in w.pids}
    assert not ours, f"ports still listening: {ours}"
    assert list(w.tmpdir.iterdir()) == [], f"temp left: {list(w.tmpdir.iterdir())}"


def _judged(rc: int, rep: dict, output: str, died: str) -> None:
    """agree, a reproducible diverge, or an unknown whose diagnosis names what died."""
    assert rc in (0, 1, 125), f"exit {rc}: {output}"
    assert rep.get("complete") is True, output
    assert rep["status"] == {0: "agree", 1: "diverge", 125: "unknown"}[rc], rep["verdict"]
    run_dir = Path(rep["run_dir"])
    if rc == 1:  # nothing lost, and reproducible
        replay = Path(rep["replay"])
        assert replay.exists() and replay.parent == run_dir
        again = subprocess.run([sys.executable, "-m", "scenarios.cli", "replay", str(replay),
                                "--mode", "inprocess"], cwd=REPO, env=child_env(),
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 1, again.stdout + again.stderr
    if rc == 125:
        diagnosis = json.dumps(rep["verdict"]) + json.dumps(rep.get("unconfirmed_divergences"))
        assert any(word in diagnosis for word in died.split("|")), (died, rep["verdict"])
    for u in rep.get("unconfirmed_divergences") or ():  # found, not reproduced: kept
        assert u["file"] and Path(u["file"]).exists(), u


# -- torchrun workers -------------------------------------------------------------------------
WORKER = "scenarios.runner.worker"
#: what a diagnosis says when a worker died (torch elastic's words or the pool's)
WORKER_DIED = "SIGKILL|killed|rank|pool|worker|exit"


def _reached(w: Watched, phase: str) -> bool:
    rep = w.report()
    if phase == "start-up":
        return bool(w.find(WORKER))  # workers exist: the pool is still starting
    if phase == "mid-run":
        return rep.get("runs", 0) >= 1 and rep.get("phase") == "running"
    return rep.get("phase") == "confirming a divergence"


def _kill_a_worker(tmp_path: Path, phase: str, seed: int, layout: str = "2x2") -> None:
    rng = random.Random(seed)
    variant = "tp_only_sync" if phase == "confirming" else rng.choice(["fixed", "tp_only_sync"])
    w = _start(tmp_path, "--mode", "torchrun", "--layout", layout, "--variant", variant,
               "--minutes", "0.2", "--timeout", "15", "--seed", str(seed))
    _wait(w, lambda: _reached(w, phase), 180)
    time.sleep(rng.uniform(0.0, 0.3))  # a seeded moment inside the phase
    killed = _kill(w, WORKER, rng)
    rc, rep, output = _finish(w)
    _judged(rc, rep, output, WORKER_DIED)
    _nothing_left(w)
    if killed and rc == 125:
        assert "cannot judge" in output or rep["verdict"]["diagnosis"], output


@pytest.mark.cp
def test_a_worker_killed_mid_run(tmp_path: Path) -> None:
    _kill_a_worker(tmp_path, "mid-run", seed=1, layout="1x2")


@pytest.mark.soak
@pytest.mark.cp
@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("phase", PHASES)
def test_a_worker_killed_at_a_random_moment(tmp_path: Path, phase: str, seed: int) -> None:
    _kill_a_worker(tmp_path, phase, seed)


# -- the soak's own Mooncake master ------------------------------------------------------------
MASTER = "mooncake_master"
MASTER_DIED = "Mooncake master|master"


def _kill_the_master(tmp_path: Path, phase: str, seed: int) -> None:
    from scenarios.nemesis.mooncake_master import mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)
    rng = random.Random(seed)
    w = _start(tmp_path, "--backend", "mooncake", "--variant", "tp_only_sync", "--minutes",
               "0.4", "--timeout", "15", "--seed", str(seed))
    _wait(w, lambda: _reached(w, phase) if phase != "start-up" else bool(w.find(MASTER)), 180)
    time.sleep(rng.uniform(0.0, 0.2))
    _kill(w, MASTER, rng)
    rc, rep, output = _finish(w)
    _judged(rc, rep, output, MASTER_DIED)
    _nothing_left(w)


@pytest.mark.soak
@pytest.mark.mooncake
@pytest.mark.parametrize("seed", [21, 22])
@pytest.mark.parametrize("phase", ["start-up", "confirming"])
def test_the_master_killed_at_a_random_moment(tmp_path: Path, phase: str, seed: int) -> None:
    _kill_the_master(tmp_path, phase, seed)


#: a soak whose own master is SIGKILLed inside a report write (after a run, or the last one)
_KILL_WHILE_WRITING = """
import os, signal, sys, time
from scenarios.cli.main import main
from scenarios.nemesis.mooncake_master import MooncakeMaster
from scenarios.store.report import ReportWriter

masters, enter, write = [], MooncakeMaster.__enter__, ReportWriter.write_report
after_runs = int(sys.argv[1])

def remember(self):
    masters.append(self)
    return enter(self)

def kill_while_writing(self, report):
    if report.runs >= after_runs and masters and masters[0].running:
        print(f"killing master pid {masters[0].pid} while writing", file=sys.stderr, flush=True)
        os.kill(masters[0].pid, signal.SIGKILL)
        time.sleep(0.2)
    write(self, report)

MooncakeMaster.__enter__, ReportWriter.write_report = remember, kill_while_writing
sys.argv = ["cpcheck", "soak", *sys.argv[2:]]
sys.exit(main())
"""


def _kill_the_master_while_writing(tmp_path: Path, seed: int) -> None:
    from scenarios.nemesis.mooncake_master import mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)
    rng = random.Random(seed)
    after_runs = rng.randint(1, 3)  # the seeded moment: the report write after that many runs
    out, tmpdir = tmp_path / "soak", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WHILE_WRITING, str(after_runs), "--backend", "mooncake",
         "--minutes", "0.2", "--timeout", "10", "--seed", str(seed), "--out", str(out)],
        cwd=REPO, env=child_env(TMPDIR=str(tmpdir)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    w = Watched(proc, out, tmpdir)
    _wait(w, lambda: False, 240)  # watch it (processes, ports) until it ends
    rc, rep, output = _finish(w)
    # every run judged agreed: agree if the kill came after the last one, else the next
    # run's check names the master
    assert rc in (0, 125), output
    _judged(rc, rep, output, MASTER_DIED)
    _nothing_left(w)


@pytest.mark.soak
@pytest.mark.mooncake
@pytest.mark.parametrize("seed", [5, 31, 32])
def test_the_master_killed_while_writing_at_a_random_moment(tmp_path: Path, seed: int) -> None:
    _kill_the_master_while_writing(tmp_path, seed)
