"""The soak under its own faults (issue 23): a full disk, a shared --out, signals at start-up,
SIGKILL, and the soak's own master killed mid-run. Each time the verdict is agree, a
reproducible diverge or a diagnosed unknown, and nothing found is lost."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scenarios.store.report as report
from scenarios.cli.main import main
from scenarios.core.errors import UsageError
from scenarios.store.report import SOAK_REPORT_SCHEMA, SoakReport
from scenarios.store.run_dir import RunDir
from tests.subprocess_env import REPO, child_env


def _load_factor() -> float:
    """How oversubscribed the CPUs are now (this suite shares hosts): limits stretch by it."""
    return max(1.0, os.getloadavg()[0] / (len(os.sched_getaffinity(0)) or 1))


def _popen(*argv: str, tmpdir: Path | None = None) -> subprocess.Popen:
    env = child_env(**({"TMPDIR": str(tmpdir)} if tmpdir else {}))
    return subprocess.Popen([sys.executable, "-m", "scenarios.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, limit_s: float, proc: subprocess.Popen | None = None) -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.communicate()}")
        time.sleep(0.05)
    if proc is not None:
        proc.kill()
    raise AssertionError(f"condition not met within {limit_s} s")


def _report(out: Path) -> dict:
    try:
        return json.loads((out / "latest" / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _enospc(monkeypatch) -> None:  # noqa: ANN001
    """Every atomic write fails as on a full disk (in-process stand-in for a tiny tmpfs)."""
    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "atomic_write_bytes", full)


# -- a full disk -------------------------------------------------------------------------------
def test_a_divergence_on_a_full_disk_keeps_its_verdict_and_prints_the_replay(
        tmp_path: Path, monkeypatch, capsys) -> None:
    _enospc(monkeypatch)
    rc = main(["soak", "--minutes", "0.5", "--variant", "cp_rank_in_key", "--seed", "1",
               "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1, cap.out + cap.err
    assert "DIVERGE [" in cap.out and "confirmed by replay" in cap.out
    # the replay file's contents are on stderr, before the write failed
    body = cap.err.split("replay file replay-", 1)[1].split(":\n", 1)[1]
    data = json.loads(body[:body.index("\n}\n") + 2])
    assert data["kind"] == "cpcheck-replay" and data["verdict"]["status"] == "diverge"
    assert "NOT SAVED" in cap.out and "No space left on device" in cap.out


def test_an_agreeing_soak_on_a_full_disk_agrees_and_says_what_was_not_saved(
        tmp_path: Path, monkeypatch, capsys) -> None:
    _enospc(monkeypatch)
    rc = main(["soak", "--minutes", "0.03", "--seed", "2", "--out", str(tmp_path), "--json"])
    cap = capsys.readouterr()
    d = json.loads(cap.out.strip().splitlines()[-1])
    assert rc == 0 and d["status"] == "agree", cap.out + cap.err
    assert any(x.startswith("report.json: No space left") for x in d["not_saved"])


def test_explore_divergence_on_a_full_disk_keeps_exit_1(tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    _enospc(monkeypatch)
    rc = main(["explore", "--variant", "tp_only_sync", "--layout", "2x2", "--examples", "50",
               "--replay-dir", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1, cap.out + cap.err
    assert '"kind": "cpcheck-replay"' in cap.err and "could not save" in cap.err


def test_a_real_full_tmpfs_keeps_the_divergence(tmp_path: Path) -> None:
    """The same on a 64 KiB tmpfs (root only): the replay is on stderr, the verdict exit 1."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the in-process ENOSPC tests cover it")
    try:
        with contextlib.suppress(OSError):
            (tiny / "filler").write_bytes(b"x" * (60 << 10))
        proc = _popen("soak", "--minutes", "0.5", "--variant", "leak_on_revoke", "--seed", "0",
                      "--out", str(tiny))
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 1, out + err
        assert "DIVERGE [" in out and '"kind": "cpcheck-replay"' in err
        assert "internal error" not in out + err
    finally:
        subprocess.run(["umount", "-l", str(tiny)], capture_output=True)


# -- one soak, one directory ---------------------------------------------------------------------
def test_two_soaks_with_one_out_keep_both_reports(tmp_path: Path) -> None:
    for seed in ("5", "6"):
        assert main(["soak", "--minutes", "0.02", "--seed", seed, "--out", str(tmp_path)]) == 0
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert [SoakReport.load(p).seed for p in runs] == [5, 6]
    assert os.readlink(tmp_path / "latest") == runs[1].name
    assert SoakReport.load(tmp_path / "latest").complete is True


def test_a_second_writer_of_one_run_dir_is_refused(tmp_path: Path) -> None:
    held = RunDir.claim(tmp_path / "run")
    with pytest.raises(UsageError, match="another cpcheck soak"):
        RunDir.claim(tmp_path / "run")
    held.release()
    RunDir.claim(tmp_path / "run").release()  # free again once released


def test_the_same_seed_in_the_same_second_gets_its_own_dir(tmp_path: Path) -> None:
    a = RunDir.fresh(tmp_path, 7, now=0.0)
    b = RunDir.fresh(tmp_path, 7, now=0.0)
    assert a.path != b.path and b.path.name.endswith("-2")
    a.release()
    b.release()


# -- signals and kills at every phase --------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_finishes_the_report(tmp_path: Path, sig: int) -> None:
    """After the seed line, before the first chunk (torchrun workers take seconds to start)."""
    out, tmpdir = tmp_path / "soak", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _popen("soak", "--mode", "torchrun", "--minutes", "5", "--seed", "1", "--out",
                  str(out), tmpdir=tmpdir)
    _wait_for(lambda: _report(out).get("phase", "").startswith("start-up"), 120, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    rep = _report(out)
    assert rep["complete"] is True and rep["interrupted"] is True and rep["runs"] == 0
    assert rep["phase"].startswith("start-up"), rep["phase"]
    assert "INTERRUPTED before any run was judged" in stdout
    assert list(tmpdir.iterdir()) == [], "temp directories left behind"


def test_sigterm_at_the_first_instruction_is_130_not_a_silent_death(tmp_path: Path) -> None:
    proc = _popen("soak", "--minutes", "5", "--out", str(tmp_path))
    time.sleep(0.3)  # the interpreter is still importing torch
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stdout + stderr)
    assert "interrupted" in stdout + stderr


def test_a_killed_soaks_report_says_it_is_not_complete(tmp_path: Path) -> None:
    proc = _popen("soak", "--minutes", "5", "--seed", "1", "--out", str(tmp_path))
    _wait_for(lambda: _report(tmp_path).get("runs", 0) >= 2, 120, proc)
    proc.kill()
    proc.communicate()
    rep = _report(tmp_path)
    assert rep["schema"] == SOAK_REPORT_SCHEMA and rep["complete"] is False
    assert rep["phase"] == "running" and rep["provenance"]["argv"][:2] == ["cpcheck", "soak"]
    # the lock died with the process: the run dir can be claimed again
    RunDir.claim(Path(rep["run_dir"])).release()


def test_the_report_carries_provenance_and_fault_shares(tmp_path: Path) -> None:
    assert main(["soak", "--minutes", "0.05", "--seed", "3", "--faults", "slow_rank",
                 "--out", str(tmp_path)]) == 0
    rep = SoakReport.load(tmp_path / "latest")
    assert rep.provenance["cpcheck"] and "commit" in rep.provenance["git"]
    fr = rep.fault_runs
    assert fr["runs"] == rep.runs and 0 <= fr["gated_runs"] <= rep.runs
    assert 0 < fr["by_kind"]["slow_rank"]["runs"] <= fr["runs"]


@pytest.mark.parametrize("seed", ["1", "2"])
def test_a_fault_soak_meets_its_faults_in_gated_chunks_too(tmp_path: Path, capsys,
                                                           seed: str) -> None:
    """Gated coverage chunks used to draw no faults (a 1-minute fault soak ran 24 of 28 chunks
    gated and met almost no fault): now every chunk draws a plan, and the report says how many
    runs, gated ones included, each kind met."""
    # a run count, not a wall-clock one: a loaded CI box ran 4 chunks in 12 s, none gated yet
    assert main(["soak", "--minutes", "0.2", "--min-runs", "12", "--seed", seed, "--faults",
                 "slow_rank,storage_errors", "--out", str(tmp_path)]) == 0
    rep = SoakReport.load(tmp_path / "latest")
    fr = rep.fault_runs
    assert fr["runs"] >= 12 and fr["gated_runs"] > 0, fr
    assert sum(v["gated_runs"] for v in fr["by_kind"].values()) > 0, fr
    assert any(e.gated for e in rep.fault_events)
    assert f"{fr['gated_runs']} of {fr['runs']} runs were gated coverage chunks" in \
        capsys.readouterr().out


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["soak", "--backend", "mooncake", "--mooncake-master", "nonsense"],
    ["soak", "--backend", "mooncake", "--mooncake-master", "localhost:99999"],
    ["run", "write_acks", "--mooncake-master", "localhost:0"],
    ["soak", "--minutes", "nope"],
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, capsys, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, *(["--out", str(tmp_path)] if argv[0] == "soak" else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err
    assert not (tmp_path / "latest").exists()


@pytest.mark.parametrize("argv", [
    ["soak", "--minutes", "0.02", "--mooncake-master", "127.0.0.1:1"],
    ["run", "write_acks", "--mode", "inprocess", "--mooncake-master", "127.0.0.1:1"],
    ["explore", "--examples", "2", "--mooncake-master", "127.0.0.1:1"],
])
def test_a_master_without_the_mooncake_backend_is_refused(tmp_path: Path, capsys,
                                                          argv: list[str]) -> None:
    where = ["--out", str(tmp_path)] if argv[0] == "soak" else ["--replay-dir", str(tmp_path)]
    assert main([*argv, *where]) == 2
    assert "--mooncake-master needs" in capsys.readouterr().err
    assert not (tmp_path / "latest").exists()


# -- the soak's own master ---------------------------------------------------------------------
@pytest.mark.mooncake
def test_killing_the_soaks_own_master_ends_it_125_within_10_s(tmp_path: Path) -> None:
    """A 5-minute budget and 60 s rank timeouts: only the in-flight check can end it fast."""
    from scenarios.nemesis.mooncake_master import master_pids, mooncake_available

    ok, why = mooncake_available()
    if not ok:
        pytest.skip(why)
    import psutil

    proc = _popen("soak", "--backend", "mooncake", "--minutes", "5", "--timeout", "60",
                  "--seed", "1", "--out", str(tmp_path))
    _wait_for(lambda: _report(tmp_path).get("runs", 0) >= 2, 180, proc)
    mine = [p for p in master_pids() if psutil.Process(p).ppid() == proc.pid]
    assert len(mine) == 1, mine
    t0 = time.monotonic()
    os.kill(mine[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 125, stdout + stderr
    assert took < 10.0 * _load_factor(), f"{took:.1f} s from the kill to the exit"
    rep = _report(tmp_path)
    assert rep["complete"] is True and rep["status"] == "unknown"
    assert "Mooncake master" in rep["verdict"]["diagnosis"]
    assert "without a master_restart" in rep["verdict"]["diagnosis"]
    assert "AGREE" not in stdout


def test_the_watchdog_interrupts_a_run_and_says_what_it_waits_on(monkeypatch, capsys) -> None:
    import scenarios.campaigns.soak_watch as watch

    monkeypatch.setattr(watch, "SLOW_RUN_S", 0.2)
    seen = {"n": 0}

    def check() -> str:
        seen["n"] += 1
        return "the master is gone" if seen["n"] >= 4 else ""

    t0 = time.monotonic()
    with watch.lost_raises() as can_interrupt, pytest.raises(watch.InfrastructureLost):
        dog = watch.Watchdog(check, lambda: "run 1 in flight for 9 s", can_interrupt)
        dog.start()
        time.sleep(30)  # a run that would hang: the watchdog cuts it
    dog.stop()
    assert time.monotonic() - t0 < 10 and dog.lost == "the master is gone"
    assert "soak: run 1 in flight for 9 s" in capsys.readouterr().err


def test_ctrl_c_while_writing_the_report_still_finishes_it(tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    """The interrupt lands in a report write: the soak ends 130, the report is completed on
    the way out and no temp file is left."""
    real, calls = report.atomic_write_bytes, {"n": 0}

    def cut_third(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(report, "atomic_write_bytes", cut_third)
    assert main(["soak", "--minutes", "1", "--seed", "4", "--out", str(tmp_path)]) == 130
    rep = SoakReport.load(tmp_path / "latest")
    assert rep.complete is True and rep.interrupted is True
    assert not list((tmp_path / "latest").glob(".*.tmp"))
    assert "INTERRUPTED" in capsys.readouterr().out


def test_headers_name_the_profile_an_alias_variant_runs(tmp_path: Path, capsys) -> None:
    """tp_only_sync is sglang-0.5.10 with DP attention, whatever the schedule's own protocol."""
    main(["soak", "--minutes", "0.02", "--seed", "0", "--variant", "tp_only_sync", "--layout",
          "2x2", "--dp-attention", "off", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "protocol=sglang-0.5.10 dp_attention=on" in out, out
    rep = SoakReport.load(tmp_path / "s" / "latest")
    assert (rep.protocol, rep.dp_attention) == ("sglang-0.5.10", True)
    main(["run", "write_acks", "--variant", "tp_only_sync", "--mode", "inprocess",
          "--replay-dir", str(tmp_path)])
    assert "protocol=sglang-0.5.10 dp_attention=on" in capsys.readouterr().out


def test_min_runs_goes_past_the_budget_but_not_for_ever() -> None:
    from scenarios.core.soak_config import MIN_RUNS_SLACK, SoakConfig

    cfg = SoakConfig(minutes=0.1, min_runs=5)  # a 6 s budget
    assert cfg.goes_on(5.9, 0)
    assert cfg.goes_on(30.0, 4)  # past the budget, 4 of 5 runs judged: on
    assert not cfg.goes_on(30.0, 5)
    assert not cfg.goes_on(6.0 * MIN_RUNS_SLACK, 0)  # every run cut: it still ends
    assert not SoakConfig(minutes=0.1).goes_on(6.0, 0)  # without --min-runs: the budget
