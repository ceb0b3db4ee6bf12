"""`soak --shard I/N` and `report merge`: a nightly spread over runners gives one report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scenarios.campaigns.report_merge import check_one_nightly, merge
from scenarios.campaigns.shard import plan_shard, shard_seed
from scenarios.cli.main import main
from scenarios.core.errors import UsageError


def _soak(out: Path, shard: str, *extra: str) -> int:
    return main(["soak", "--minutes", "0.02", "--seed", "11", "--shard", shard,
                 "--out", str(out), *extra])


def _report(folder: Path) -> dict:
    """A merged report (in `folder`) or a soak's (in its run dir, `folder`/latest)."""
    path = folder / "report.json"
    return json.loads((path if path.exists() else folder / "latest" / "report.json").read_text())


def test_three_shards_merge_into_one_report_sum_of_runs_worst_verdict(tmp_path: Path,
                                                                      capsys) -> None:
    """tp_only_sync agrees on 2x1 (no CP peer to disagree with) and diverges on 2x2: from one
    definition, shard 3 alone diverges, and the merge says so with its replay file kept."""
    lay = ["--variant", "tp_only_sync", "--layout", "2x1,2x1,2x2"]
    codes = [_soak(tmp_path / f"s{i}", f"{i}/3", *lay) for i in (1, 2, 3)]
    assert codes == [0, 0, 1]
    reps = [_report(tmp_path / f"s{i}") for i in (1, 2, 3)]
    assert [r["layout"] for r in reps] == ["2x1", "2x1", "2x2"]
    assert len({r["seed"] for r in reps}) == 3  # each runner its own seed
    out = tmp_path / "merged"
    capsys.readouterr()
    rc = main(["report", "merge", *(str(tmp_path / f"s{i}") for i in (1, 2, 3)),
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 1, text
    m = _report(out)
    assert m["runs"] == sum(r["runs"] for r in reps) > 0
    assert m["decisions"] == sum(r["decisions"] for r in reps)
    assert m["status"] == "diverge" and m["verdict"]["message"].startswith("3/3: ")
    kept = Path(m["replay"])
    assert kept.parent == out and kept.name == Path(reps[2]["replay"]).name
    assert json.loads(kept.read_text())["verdict"]["status"] == "diverge"
    assert m["coverage"]["prefetch"] and "| prefetch |" in text
    assert m["timeline"][-1]["runs"] == m["runs"]
    for png in ("decisions_per_s.png", "prefetch_outcomes.png", "host_pool.png",
                "coverage.png"):
        assert (out / png).stat().st_size > 0
    # the replay file replays on its own
    assert main(["replay", str(kept), "--mode", "inprocess"]) == 1


def _rep(status: str, shard: int | None = None, count: int = 3, base: int = 5,
         runs: int = 10) -> dict:
    v = {"ok": status == "agree", "status": status, "invariant": None, "message": status,
         "diagnosis": status if status == "unknown" else None, "failures": [], "stats": {}}
    sh = None if shard is None else {"shard": f"{shard}/{count}", "index": shard,
                                     "count": count, "base_seed": base, "layouts": ["2x2"]}
    return {"schema": 2, "runs": runs, "decisions": 100 * runs, "seconds": 60.0,
            "status": status, "verdict": v, "shard": sh, "faults": {"slow_rank": 1},
            "coverage": {"prefetch": {"revoked": runs}, "prefetch_shares": {"revoked": 1.0}},
            "timeline": [{"t": 1.0, "runs": runs, "decisions": 100 * runs,
                          "run_decisions_per_s": 1.0, "faults_in_run": 0}]}


@pytest.mark.parametrize(("statuses", "worst", "from_shard"), [
    (["agree", "agree", "agree"], "agree", None),
    (["agree", "unknown", "agree"], "unknown", "2/3"),
    (["unknown", "diverge", "agree"], "diverge", "2/3"),
    (["diverge", "unknown", "diverge"], "diverge", "1/3"),
])
def test_merged_verdict_is_the_worst(statuses: list[str], worst: str,
                                     from_shard: str | None) -> None:
    reps = [_rep(s, i + 1) for i, s in enumerate(statuses)]
    m, cov = merge(reps, ["a", "b", "c"], {}, [])
    assert m["status"] == worst and m["runs"] == 30 and m["decisions"] == 3000
    assert cov.counts["prefetch"]["revoked"] == 30
    assert m["coverage"]["prefetch_shares"]["revoked"] == 1.0  # recomputed, not summed
    assert m["faults"] == {"slow_rank": 3}
    if from_shard:
        assert m["verdict"]["message"].startswith(f"{from_shard}: ")


def test_a_missing_shard_makes_an_agreeing_merge_unknown() -> None:
    reps = [_rep("agree", 1), _rep("agree", 3)]
    missing = check_one_nightly(reps, ["a", "c"])
    assert missing == ["2/3"]
    m, _ = merge(reps, ["a", "c"], {}, missing)
    assert m["status"] == "unknown" and "2/3" in m["verdict"]["diagnosis"]


@pytest.mark.parametrize(("reps", "needle"), [
    ([_rep("agree", 1), _rep("agree", 1)], "given twice"),
    ([_rep("agree", 1), _rep("agree", 2, count=4)], "not one nightly"),
    ([_rep("agree", 1), _rep("agree", 2, base=6)], "not one nightly"),
    ([_rep("agree", 1), _rep("agree")], "unsharded"),
])
def test_shards_of_different_nightlies_are_refused(reps: list[dict], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        check_one_nightly(reps, ["a", "b"])


def test_shard_seeds_are_distinct_stable_and_1_of_1_is_the_plain_soak() -> None:
    for base in (0, 7, 123456):
        seeds = [shard_seed(base, i, 16) for i in range(1, 17)]
        assert len(set(seeds)) == 16 and seeds == [shard_seed(base, i, 16) for i in range(1, 17)]
        assert shard_seed(base, 1, 1) == base
    assert plan_shard("2x2", 9, None).seed == 9
    assert [plan_shard("1x2,2X2", 9, f"{i}/3").layout for i in (1, 2, 3)] == ["1x2", "2x2", "1x2"]


@pytest.mark.parametrize("argv", [
    ["soak", "--shard", "0/3"],
    ["soak", "--shard", "4/3"],
    ["soak", "--shard", "1/0"],
    ["soak", "--shard", "one/3"],
    ["soak", "--layout", "1x2,2x2"],  # a list without --shard: which one?
    ["soak", "--shard", "1/3", "--layout", "1x2,2y2"],
])
def test_bad_shard_is_one_line_and_exit_2(tmp_path: Path, capsys, argv: list[str]) -> None:
    assert main([*argv, "--minutes", "0.02", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpcheck: "), err
    assert not (tmp_path / "o" / "report.json").exists()  # before any work


def test_bad_merge_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "report.json").write_text(json.dumps(_rep("agree")))
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text("{not json")
    cases = [([str(empty)], "no report.json"), ([str(tmp_path / "nope")], "no such folder"),
             ([str(broken)], "not a soak report"), ([str(good), str(good)], "given twice")]
    for dirs, needle in cases:
        assert main(["report", "merge", *dirs, "--out", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main(["report", "merge", str(good), "--out", str(good)]) == 2
    assert "is one of the reports" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_timelines_interleave_on_one_clock_with_sums_over_shards() -> None:
    from scenarios.campaigns.report_merge import merge_timelines

    def tl(ts: list[float], per_run: int) -> dict:
        return {"timeline": [{"t": t, "runs": k, "decisions": per_run * k,
                              "run_decisions_per_s": 1.0, "faults_in_run": 0}
                             for k, t in enumerate(ts, 1)]}

    m = merge_timelines([tl([1.0, 3.0], 10), tl([2.0, 4.0, 5.0], 100)])
    assert [(p["t"], p["shard"], p["runs"], p["decisions"]) for p in m] == [
        (1.0, 1, 1, 10), (2.0, 2, 2, 110), (3.0, 1, 3, 120), (4.0, 2, 4, 220), (5.0, 2, 5, 320)]


def _run_group(cmd: list[str], env: dict, timeout: float = 120) -> Any:
    """Run a script in its own process group and kill the whole group on the way out: a
    timeout must not leave the script's children running (an orphaned nightly step ran on
    for an hour once)."""
    import os
    import signal
    import subprocess

    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def test_nightly_script_runs_shards_and_merges_them(tmp_path: Path) -> None:
    """scripts/nightly.sh as the workflow runs it: SOAK_SHARD=I/N per runner, then `merge`."""
    import sys

    from tests.subprocess_env import REPO, child_env

    knobs = {"MUTATION_MINUTES": "0", "SOAK_MODE": "inprocess", "SOAK_BACKEND": "memory",
             "SOAK_FAULTS": "slow_rank", "SOAK_MINUTES": "0.02", "SOAK_SEED": "5", "SOAK_LAYOUT": "1x2,2x2",
             "PYTHON": sys.executable}
    script = str(REPO / "scripts" / "nightly.sh")
    for i in (1, 2):
        env = child_env(**knobs, SOAK_SHARD=f"{i}/2", SOAK_TESTS="0")
        r = _run_group(["bash", script, str(tmp_path / f"s{i}")], env)
        assert r.returncode == 0, r.stderr[-2000:]
    reps = [_report(tmp_path / f"s{i}") for i in (1, 2)]
    assert [r["shard"]["shard"] for r in reps] == ["1/2", "2/2"]
    assert [r["layout"] for r in reps] == ["1x2", "2x2"]
    r = _run_group(["bash", script, "merge", str(tmp_path / "m"), str(tmp_path / "s1"),
                    str(tmp_path / "s2")], child_env(PYTHON=sys.executable))
    assert r.returncode == 0, r.stderr[-2000:]
    m = _report(tmp_path / "m")
    assert m["runs"] == sum(x["runs"] for x in reps)
    assert m["faults"]["slow_rank"] == sum(x["faults"]["slow_rank"] for x in reps) > 0
