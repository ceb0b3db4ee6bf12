"""`--placement`: which host each layout rank lives on in a pool over several hosts.

The arithmetic is checked over many layouts and host counts; one two-agent pool on 127.0.0.1
shows that the ranks sharing an agent are the ones asked for (each rank reports its agent).
"""

from __future__ import annotations

import pytest

from scenarios.cli.main import main
from scenarios.core.errors import PlacementError
from scenarios.core.layout import Layout
from scenarios.runner.placement import PLACEMENTS, Placement, make_placement
from scenarios.runner.torchrun_pool import RankPool
from tests.test_multihost_pool import _agent, _free_port, _stop

LAYOUTS = ["1x2", "2x1", "2x2", "1x4", "4x1", "2x4", "4x2", "4x4", "2x2x2", "2x3", "3x2",
           "8x2", "2x8", "1x8", "2x2x4"]


def _groups(layout: Layout, kind: str) -> list[tuple[int, ...]]:
    return [ranks for k, ranks in layout.all_groups() if k == kind]


def placement_problems(p: Placement, layout: Layout) -> list[str]:
    """What is wrong with `p` for its name (empty: it is what was asked)."""
    out = []
    if sorted(p.order) != list(range(layout.world_size)):
        out.append(f"not a permutation: {p.order}")
    if any(len(p.ranks_on(k)) != p.per for k in range(p.nnodes)):
        out.append("hosts hold different numbers of ranks")
    kind = {"tp-local": "attn_tp", "cp-local": "attn_cp"}.get(p.name)
    if kind:
        out += [f"{kind} group {g} spans hosts {p.hosts_of(g)}" for g in _groups(layout, kind)
                if len(p.hosts_of(g)) != 1]
    if p.name == "spread":
        out += [f"{kind} group {g} sits on one host" for kind in ("attn_tp", "attn_cp")
                for g in _groups(layout, kind) if len(g) > 1 and len(p.hosts_of(g)) == 1]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nnodes", [2, 4])
@pytest.mark.parametrize("name", PLACEMENTS)
def test_every_placement_is_what_it_says_or_refused(layout: str, nnodes: int, name: str) -> None:
    lay = Layout.parse(layout)
    try:
        p = make_placement(name, lay, nnodes)
    except PlacementError as e:
        per = lay.world_size // nnodes if lay.world_size % nnodes == 0 else 0
        size = {"tp-local": lay.tp, "cp-local": lay.cp}.get(name)
        # refused only where no placement can hold it: uneven hosts, or a group > a host
        assert not per or (size is not None and (size > per or per % size)), str(e)
        assert "\n" not in str(e)
        return
    assert placement_problems(p, lay) == []
    assert all(p.layout_rank(p.torchrun_rank(r)) == r for r in range(lay.world_size))


def test_the_checker_fires_on_a_planted_wrong_placement() -> None:
    """torchrun's order labelled cp-local / spread on 2x2 over two hosts is caught."""
    lay = Layout.parse("2x2")
    ident = (0, 1, 2, 3)
    assert placement_problems(Placement("cp-local", 2, 2, ident), lay)
    assert placement_problems(Placement("spread", 2, 2, ident), lay)
    assert placement_problems(Placement("tp-local", 2, 2, (0, 2, 1, 3)), lay)
    assert placement_problems(Placement("torchrun", 2, 2, (0, 1, 1, 3)), lay)


def test_placement_bad_combinations_are_one_line_exit_2(tmp_path, capsys) -> None:
    ep = f"127.0.0.1:{_free_port()}"
    base = ["soak", "--minutes", "0.02", "--out", str(tmp_path / "o")]
    for extra, needle in [
        (["--placement", "spread"], "needs --nnodes"),
        (["--mode", "torchrun", "--nnodes", "2", "--rdzv-endpoint", ep, "--layout", "4x1",
          "--placement", "tp-local"], "has 4 ranks, a host holds 2"),
        (["--mode", "torchrun", "--nnodes", "2", "--rdzv-endpoint", ep, "--layout", "2x2",
          "--placement", "nowhere"], "choose from"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (extra, err)
    with pytest.raises(PlacementError):
        RankPool("2x2", placement="cp-local")  # one host has nothing to place


def _who_shares_an_agent(layout: str, placement: str) -> list[set[int]]:
    """Start `layout` over two agents under `placement`; the sets of layout ranks per agent,
    each rank saying which agent (torchrun process) it runs under."""
    ep = f"127.0.0.1:{_free_port()}"
    agent = _agent(ep)
    try:
        with RankPool(layout, nnodes=2, rdzv_endpoint=ep, start_timeout_s=90,
                      placement=placement) as pool:
            pings = pool.run("scenarios.runner.jobs_builtin:ping", None, timeout_s=30)
            assert [p["rank"] for p in pings] == list(range(pool.world_size))
            # a collective over each CP group and each TP group, across hosts or not
            for group in ("attn_cp", "attn_tp"):
                got = pool.run("scenarios.runner.jobs_builtin:allreduce_min",
                               {"group": group, "values": [10 + r for r in range(len(pings))]},
                               timeout_s=30)
                ranks = pool.run("scenarios.runner.jobs_builtin:group_ranks", None,
                                 timeout_s=30)
                assert got == [10 + min(g[group]) for g in ranks]
            by_agent: dict[int, set[int]] = {}
            for p in pings:
                by_agent.setdefault(p["agent_pid"], set()).add(p["rank"])
            nodes = {p["agent_pid"]: p["node"] for p in pings}
            for pid, ranks_there in by_agent.items():  # the pool names the same hosts
                assert set(pool.placement.ranks_on(nodes[pid])) == ranks_there
            return sorted(by_agent.values(), key=min)
    finally:
        _stop(agent)


@pytest.mark.cp  # the one two-agent case of the default suite
def test_cp_local_2x2_over_two_agents_keeps_each_cp_group_on_one_agent() -> None:
    assert _who_shares_an_agent("2x2", "cp-local") == [{0, 2}, {1, 3}]


@pytest.mark.cp
@pytest.mark.soak  # two agents more: `-m cp` and the nightly
@pytest.mark.parametrize(("name", "want"), [("spread", [{0, 3}, {1, 2}]),
                                            ("tp-local", [{0, 1}, {2, 3}]),
                                            ("torchrun", [{0, 1}, {2, 3}])])
def test_other_placements_over_two_agents(name: str, want: list[set[int]]) -> None:
    assert _who_shares_an_agent("2x2", name) == want


def test_a_placement_agent_reads_it_from_the_store() -> None:
    from scenarios.runner.multihost import PoolConfig, torchrun_command

    cfg = PoolConfig("abc", "2x2", "cpu", 10.0, 2, 2, "127.0.0.1:1", "00", "spread")
    assert PoolConfig.from_json(cfg.to_json()) == cfg
    assert "--placement=spread" in torchrun_command("py", cfg, "127.0.0.1:5", is_host=False)
    old = '{"pool_id": "a", "layout": "1x2", "device": "cpu", "collective_timeout_s": 1.0, ' \
          '"nnodes": 2, "nproc_per_node": 1, "address": "h:1", "authkey_hex": "00"}'
    assert PoolConfig.from_json(old).placement == "torchrun"  # a config of an older controller


@pytest.mark.cp
@pytest.mark.soak  # two agents, four runs: `-m cp` and the nightly
@pytest.mark.parametrize("name", ["cp-local", "spread"])
def test_a_placed_2x2_agrees_when_fixed_and_catches_tp_only_sync(tmp_path, name: str) -> None:
    """The verdicts do not depend on where ranks live; the replay file runs on one host."""
    ep = f"127.0.0.1:{_free_port()}"
    agent = _agent(ep)
    base = ["run", "write_acks", "--layout", "2x2", "--mode", "torchrun", "--nnodes", "2",
            "--rdzv-endpoint", ep, "--placement", name, "--replay-dir", str(tmp_path)]
    try:
        assert main(base) == 0
        assert main([*base, "--variant", "tp_only_sync"]) == 1
    finally:
        _stop(agent)
    (replay,) = tmp_path.glob("replay-tp_only_sync-2x2-*.json")
    assert main(["replay", str(replay), "--mode", "torchrun"]) == 1


def test_torch_elastic_failures_are_named_by_layout_rank(tmp_path) -> None:
    """torch elastic names torchrun's ranks; under cp-local torchrun rank 1 is layout rank 2."""
    import json

    from scenarios.runner.launch import SCHEMA_VERSION

    pool = RankPool("2x2", nnodes=2, rdzv_endpoint="127.0.0.1:1", placement="cp-local")
    pool._tmp_dir = str(tmp_path)  # where the launcher writes its record
    failure = {"rank": 1, "local_rank": 1, "pid": 7, "exitcode": -9, "signal": "SIGKILL",
               "timestamp": 1, "message": "", "traceback": "", "error_file": ""}
    (tmp_path / "rank-failures.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "root_cause": 1, "failures": [failure]}))
    report = pool._failures()
    pool._tmp_dir = None
    assert report is not None and report.root_cause == 2 and report.first.rank == 2
