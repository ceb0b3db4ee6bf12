"""A soak never loses what it found: the report is written as it goes, completed on SIGINT and
SIGTERM, the verdict line is always printed, and Ctrl-C ends it within 3 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from scenarios.cli.main import main
from scenarios.store.report import SOAK_REPORT_SCHEMA
from tests.subprocess_env import REPO, child_env

STOP_WITHIN_S = 3.0  # the requirement, on a host whose CPUs are not oversubscribed


def _stop_limit() -> float:
    """3 s, stretched by how oversubscribed the CPUs are right now (this suite shares hosts)."""
    load = os.getloadavg()[0] / (len(os.sched_getaffinity(0)) or 1)
    return STOP_WITHIN_S * max(1.0, load)


def _start_soak(out: Path, *extra: str, tmpdir: Path | None = None) -> subprocess.Popen:
    env = child_env(**({"TMPDIR": str(tmpdir)} if tmpdir else {}))
    return subprocess.Popen([sys.executable, "-m", "scenarios.cli", "soak", "--minutes", "5",
                             "--seed", "1", "--out", str(out), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_runs(proc: subprocess.Popen, out: Path, runs: int, limit_s: float = 120) -> dict:
    """The report on disk while the soak runs (it is rewritten after every chunk)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            rep = json.loads((out / "report.json").read_text())
        except (OSError, json.JSONDecodeError):  # not there yet (never half-written)
            rep = {}
        if rep.get("runs", 0) >= runs:
            return rep
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {runs} runs in the report after {limit_s} s")


def _stop(proc: subprocess.Popen, sig: int) -> tuple[float, str, str]:
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return time.monotonic() - t0, out, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_completes_report_prints_verdict_and_cleans_up(tmp_path: Path, sig: int) -> None:
    out, tmpdir = tmp_path / "soak", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _start_soak(out, "--backend", "file", tmpdir=tmpdir)
    during = _wait_for_runs(proc, out, 3)
    assert during["schema"] == SOAK_REPORT_SCHEMA and during["interrupted"] is False
    took, stdout, stderr = _stop(proc, sig)
    limit = _stop_limit()
    assert took < limit, f"{took:.1f} s to stop (limit {limit:.1f} s)"
    assert proc.returncode == 130, stdout + stderr
    assert "INTERRUPTED: every run so far agreed" in stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["interrupted"] is True and rep["runs"] >= during["runs"]
    for png in ("decisions_per_s.png", "prefetch_outcomes.png", "host_pool.png"):
        assert (out / png).stat().st_size > 0
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    assert list(tmpdir.iterdir()) == [], "temp directories left behind"


def test_sigkill_keeps_the_report_written_so_far(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = _start_soak(out)
    during = _wait_for_runs(proc, out, 2)
    proc.kill()
    proc.communicate()
    rep = json.loads((out / "report.json").read_text())
    assert rep["runs"] >= during["runs"] >= 2 and rep["status"] == "agree"


def test_unwritable_out_is_found_before_the_first_run(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    t0 = time.monotonic()
    assert main(["soak", "--minutes", "1", "--out", str(tmp_path / "file" / "out")]) == 2
    assert time.monotonic() - t0 < 10
    assert "not writable" in capsys.readouterr().err


def test_divergence_is_kept_when_interrupted_while_confirming(monkeypatch, tmp_path: Path,
                                                              capsys) -> None:
    import scenarios.judge.judging as judge

    def interrupted(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(judge, "confirm", interrupted)
    rc = main(["soak", "--minutes", "0.5", "--variant", "cp_rank_in_key", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rc == 125 and rep["status"] == "unknown" and rep["interrupted"] is True
    assert "before the divergence was confirmed" in rep["verdict"]["diagnosis"]
    kept = Path(rep["replay"])
    assert kept.name.startswith("unknown-") and kept.exists()  # not presented as a divergence
    assert not list(tmp_path.glob("replay-*"))
    assert "UNKNOWN: interrupted before the divergence was confirmed" in out


def test_confirmed_divergence_is_in_the_report(tmp_path: Path, capsys) -> None:
    rc = main(["soak", "--minutes", "0.5", "--variant", "cp_rank_in_key", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rc == 1 and rep["status"] == "diverge" and rep["confirmed_by_replay"] is True
    assert Path(rep["replay"]).exists() and "confirmed by replay" in out


def test_internal_error_still_prints_verdict_and_report(monkeypatch, tmp_path: Path,
                                                        capsys) -> None:
    import scenarios.campaigns.soak as soak

    real, calls = soak.make_chunk, {"n": 0}

    def third_breaks(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise AttributeError("a harness bug")
        return real(*a, **kw)

    monkeypatch.setattr(soak, "make_chunk", third_breaks)
    assert main(["soak", "--minutes", "1", "--out", str(tmp_path)]) == 125
    out = capsys.readouterr().out
    assert "UNKNOWN: internal error: AttributeError: a harness bug" in out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["runs"] == 2 and rep["status"] == "unknown"


# -- Mooncake --------------------------------------------------------------------------------
def _needs_mooncake() -> None:
    from scenarios.nemesis.mooncake_master import mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)


@pytest.mark.mooncake
def test_mooncake_soak_ctrl_c_within_3s_and_log_in_out(tmp_path: Path) -> None:
    _needs_mooncake()
    from scenarios.nemesis.mooncake_master import master_pids

    out = tmp_path / "soak"
    proc = _start_soak(out, "--backend", "mooncake")
    _wait_for_runs(proc, out, 2, limit_s=180)
    took, stdout, stderr = _stop(proc, signal.SIGINT)
    limit = _stop_limit()
    assert took < limit, f"{took:.1f} s to stop (limit {limit:.1f} s)"
    assert proc.returncode == 130 and "INTERRUPTED" in stdout, stdout + stderr
    # Mooncake's own log is in --out, not on the terminal
    assert (out / "mooncake.log").exists() and (out / "mooncake_master.log").stat().st_size > 0
    glog = [ln for ln in stderr.splitlines() if ln[:1] in "IWE" and ".cpp:" in ln]
    assert glog == [], glog[:5]
    time.sleep(1.0)
    mine = [p for p in master_pids() if _parent(p) == proc.pid]
    assert mine == []


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


@pytest.mark.mooncake
def test_sigkill_of_the_soaks_own_master_is_unknown(tmp_path: Path, capsys) -> None:
    """No master_restart fault asked: a lost master is infrastructure, not a divergence."""
    _needs_mooncake()
    from scenarios.nemesis.mooncake_master import master_pids

    killed: list[int] = []
    # under pytest-xdist this process may already own a session fixture's master: not the soak's
    before = set(master_pids())

    def kill_my_master() -> None:
        # inside the soak's 2-min budget; a loaded CI box can take a minute to the first run
        deadline = time.monotonic() + 110
        while time.monotonic() < deadline:
            mine = [p for p in master_pids() if _parent(p) == os.getpid() and p not in before]
            if mine and (tmp_path / "report.json").exists() and json.loads(
                    (tmp_path / "report.json").read_text()).get("runs", 0) >= 1:
                os.kill(mine[0], signal.SIGKILL)
                killed.append(mine[0])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_my_master, daemon=True)
    killer.start()
    rc = main(["soak", "--backend", "mooncake", "--minutes", "2", "--timeout", "2",
               "--out", str(tmp_path), "--json"])
    killer.join(timeout=5)
    captured = capsys.readouterr()
    assert killed, "the soak never reached its first run, so its master was never killed"
    d = json.loads(captured.out.strip().splitlines()[-1])
    assert rc == 125 and d["status"] == "unknown", captured.out + captured.err
    assert "master" in d["diagnosis"] and "without a master_restart" in d["diagnosis"]
    assert not list(tmp_path.glob("replay-*"))


@pytest.mark.mooncake
def test_a_port_that_is_not_a_master_is_125(tmp_path: Path, capsys) -> None:
    _needs_mooncake()
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        for argv in (["run", "write_acks", "--mode", "inprocess", "--replay-dir", str(tmp_path)],
                     ["soak", "--minutes", "0.05", "--out", str(tmp_path)]):
            assert main([*argv, "--backend", "mooncake", "--mooncake-master",
                         f"127.0.0.1:{port}"]) == 125
            assert "does not answer as a Mooncake master" in capsys.readouterr().err
    finally:
        srv.close()
    assert not list(tmp_path.glob("replay-*"))


@pytest.mark.parametrize(("argv", "sig"), [
    (["explore", "--examples", "100000", "--layout", "1x2"], signal.SIGTERM),
    (["explore", "--examples", "100000", "--layout", "1x2"], signal.SIGINT),
    (["run", "write_acks", "--mode", "torchrun"], signal.SIGTERM),
])
def test_every_mode_stops_fast_and_removes_temp_dirs(tmp_path: Path, argv: list[str],
                                                     sig: int) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "scenarios.cli", *argv,
                             "--replay-dir", str(tmp_path / "out")], cwd=REPO,
                            env=child_env(TMPDIR=str(tmpdir)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmpdir.iterdir()) and time.monotonic() < deadline:  # work has started
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    took, stdout, stderr = _stop(proc, sig)
    limit = _stop_limit()
    assert took < limit, f"{took:.1f} s to stop (limit {limit:.1f} s)"
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr
    assert list(tmpdir.iterdir()) == [], "temp directories left behind"
