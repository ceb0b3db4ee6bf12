"""`--sut sglang@PATH`: SGLang from a source tree. Fast (default suite): the name's parsing, the
tree's checks, its provenance (git commit, dirtiness, release, borrowed environment) in
verdicts and replay files, bad input, and `replay --find-fix`'s exit codes. The end-to-end bisect
over released sources is `tests/test_sglang_bisect.py` (soak)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from scenarios.cli.main import main
from scenarios.core import suts
from scenarios.core.errors import UsageError
from scenarios.core.verdict import Verdict
from scenarios.generate.catalog import load_scenario
from scenarios.store.replay import read_replay, replay_data, replay_name, write_replay
from scenarios.sut.sglang import tree as tree_mod
from scenarios.sut.sglang.executor import SglangExecutor
from tests.sglang_history import git


def _tree(root: Path, version_line: str | None = None) -> Path:
    (root / "sglang").mkdir(parents=True)
    (root / "sglang" / "__init__.py").write_text("")
    if version_line is not None:
        (root / "pyproject.toml").write_text(f'[project]\nname = "sglang"\n{version_line}\n')
    return root


def test_sut_names() -> None:
    assert suts.valid("sglang@python") and suts.valid("sglang@/abs/python")
    assert suts.is_sglang("sglang@python") and suts.is_sglang("sglang==0.5.11")
    assert not suts.is_sglang("reference")
    assert suts.sglang_tree("sglang@../sgl/python") == "../sgl/python"
    assert suts.sglang_tree("sglang==0.5.11") is None and suts.sglang_tree("sglang@") is None
    for bad in ("sglang@", "sglang@  ", "sglang==x", "sglang", "bogus"):
        assert not suts.valid(bad)
        with pytest.raises(UsageError, match="sglang@PATH"):
            suts.check(bad)
    with pytest.raises(UsageError, match="source tree, not a release"):
        suts.sglang_version("sglang@python")  # a caller that wants a release number is told
    assert load_scenario("write_acks").with_(sut="sglang@python").sut == "sglang@python"


def test_check_tree_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a directory"):
        tree_mod.check_tree(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="is not a directory"):
        tree_mod.check_tree(str(tmp_path / "f"))
    (tmp_path / "empty" / "sglang").mkdir(parents=True)  # a folder named sglang, no package
    with pytest.raises(UsageError, match="no sglang package"):
        tree_mod.check_tree(str(tmp_path / "empty"))
    assert tree_mod.check_tree(str(_tree(tmp_path / "ok"))) == (tmp_path / "ok").resolve()


@pytest.mark.parametrize("argv", [["run", "write_acks"], ["explore", "--examples", "1"]])
@pytest.mark.parametrize("where", ["nope", "file", "nopkg"])
def test_bad_tree_is_one_line_exit_2(tmp_path: Path, capsys, argv: list, where: str) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "nopkg").mkdir()
    code = main([*argv, "--sut", f"sglang@{tmp_path / where}", "--replay-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sglang@" in err[0], err


def test_git_provenance(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"
    root = _tree(repo / "python", 'version = "0.5.11"')
    assert tree_mod.git_of(root) == (None, None)  # no repository
    git(repo, "init", "-q")
    assert tree_mod.git_of(root) == (None, None)  # a repository that does not track the tree
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert tree_mod.git_of(root) == (head, False)
    (root / "sglang" / "__pycache__").mkdir()  # untracked files are not changes
    assert tree_mod.git_of(root) == (head, False)
    (root / "sglang" / "__init__.py").write_text("# changed\n")
    assert tree_mod.git_of(root) == (head, True)
    (root / "sglang" / "__init__.py").write_text("")
    (repo / "README").write_text("outside the tree")  # changes outside PATH do not count
    git(repo, "add", "README")
    assert tree_mod.git_of(root) == (head, False)


def test_release_of_tree(tmp_path: Path) -> None:
    assert tree_mod.release_of(_tree(tmp_path / "a", 'version = "0.5.10.post1"')) == "0.5.10.post1"
    assert tree_mod.release_of(_tree(tmp_path / "b", "dynamic = [\"version\"]")) is None
    repo = tmp_path / "c"
    root = _tree(repo / "python")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "tag", "v0.5.13")
    (root / "sglang" / "x.py").write_text("")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "after the tag")
    assert tree_mod.release_of(root) == "0.5.13"  # the nearest tag


def test_closest_env() -> None:
    built = ["0.5.10.post1", "0.5.11", "0.5.14", "0.5.20"]
    assert tree_mod.closest_env("0.5.11", built) == "0.5.11"
    assert tree_mod.closest_env("0.5.13", built) == "0.5.11"
    assert tree_mod.closest_env("0.5.12.post1", built) == "0.5.11"
    assert tree_mod.closest_env("0.5.10", built) == "0.5.10.post1"  # older than all: the oldest
    assert tree_mod.closest_env("0.5.30", built) == "0.5.20"
    assert tree_mod.closest_env(None, built) == "0.5.20"
    assert tree_mod.closest_env("0.5.11", []) is None


def test_worker_path_puts_the_tree_first(tmp_path: Path) -> None:
    t = tree_mod.SglangTree(str(tmp_path), "c" * 40, False, "0.5.11", "0.5.11")
    path = tree_mod.worker_path(t, "0.5.11")
    assert path[0] == str(tmp_path) and path[1:] == tree_mod.worker_path(None, "0.5.11")


def _executor_for(t: tree_mod.SglangTree) -> SglangExecutor:
    ex = object.__new__(SglangExecutor)  # no pools: only the verdict's provenance is tested
    ex.tree = t
    return ex


def test_verdict_and_replay_file_record_the_tree(tmp_path: Path, capsys) -> None:
    t = tree_mod.SglangTree(str(tmp_path / "python"), "ab" * 20, True, "0.5.11", "0.5.11")
    ex = _executor_for(t)
    ran = [SimpleNamespace(sglang_package=f"{t.path}/sglang")] * 2
    v = ex._provenance(Verdict(False, "decisions", "ranks differ"), ran)
    assert v.stats["sglang_tree"] == t.to_dict()
    s = load_scenario("write_acks").with_(sut="sglang@python", layout="1x2")
    assert replay_name(s, v).startswith("replay-sglang-tree-abababababab-dirty-dpattn-1x2-")
    data = replay_data(s, v, "torchrun")
    assert data["sut"] == "sglang@python" and data["sut_tree"]["commit"] == "ab" * 20
    path = write_replay(s, v, tmp_path, "torchrun", data=data)
    s2, back = read_replay(path)
    assert s2.sut == "sglang@python" and back["sut_tree"]["dirty"] is True
    assert "ignoring unknown field" not in capsys.readouterr().err
    # a worker that imported sglang from anywhere else: the verdict is on the wrong code
    elsewhere = [SimpleNamespace(sglang_package="/site/sglang")] * 2
    v = ex._provenance(Verdict(False, "decisions", "ranks differ"), elsewhere)
    assert v.status == "unknown" and "not from the tree" in v.diagnosis
    # a sibling directory whose name starts like the tree's is not the tree
    sibling = [SimpleNamespace(sglang_package=f"{t.path}2/sglang")] * 2
    assert ex._provenance(Verdict(True), sibling).status == "unknown"


def test_replay_of_a_tree_missing_here_is_125(tmp_path: Path, capsys) -> None:
    s = load_scenario("write_acks").with_(sut=f"sglang@{tmp_path / 'gone'}", layout="1x2")
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"schedule": json.loads(s.model_dump_json()), "sut": s.sut}))
    assert main(["replay", str(f)]) == 125
    assert "not a directory" in capsys.readouterr().err
    # the same path given with --sut is bad input
    assert main(["replay", str(f), "--sut", s.sut]) == 2


def test_replay_find_fix_swaps_agree_and_diverge(tmp_path: Path, capsys) -> None:
    s = load_scenario("write_acks").with_(layout="2x2")
    for variant, plain in (("tp_only_sync", 1), ("fixed", 0)):
        sv = s.with_(variant=variant)
        path = write_replay(sv, Verdict(plain == 0), tmp_path, "inprocess")
        assert main(["replay", str(path), "--mode", "inprocess"]) == plain
        assert main(["replay", str(path), "--mode", "inprocess", "--find-fix"]) == 1 - plain
        assert f"--find-fix: exit {1 - plain}" in capsys.readouterr().out
    # 125 (and 2) pass through unchanged: `git bisect run` skips (or stops on) them
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"schedule": json.loads(s.with_(layout="8x8").model_dump_json())}))
    assert main(["replay", str(big), "--find-fix"]) == 125
    assert main(["replay", str(tmp_path / "missing.json"), "--find-fix"]) == 2
