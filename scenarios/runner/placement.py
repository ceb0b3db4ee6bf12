"""Which host each layout rank lives on, for a pool over several hosts (`--placement`).

torchrun numbers its ranks node by node (node ``k`` holds ranks ``k*n .. k*n+n-1``). A
placement is a permutation from torchrun's rank to the layout's rank (its (tp, cp, pp)
coordinates); the worker joins the gloo world under its layout rank, so every group, job and
replay file speaks layout ranks whatever host a rank runs on. Which group crosses the network
changes what lags, hence the choice:

- ``torchrun``: layout rank = torchrun's rank (the default; TP peers are contiguous, so each
  attention-TP group stays on one host when it fits);
- ``tp-local``: each attention-TP group on one host (refused when a TP group is larger than a
  host or hosts cannot hold whole groups);
- ``cp-local``: each attention-CP group on one host (same rule for CP groups);
- ``spread``: each attention-TP and attention-CP group over as many hosts as it can.
"""

from __future__ import annotations

from dataclasses import dataclass

from scenarios.core.errors import PlacementError
from scenarios.core.layout import Layout

PLACEMENTS = ("torchrun", "tp-local", "cp-local", "spread")
DEFAULT_PLACEMENT = "torchrun"


@dataclass(frozen=True)
class Placement:
    """``order[t]`` is the layout rank of torchrun rank ``t``; node ``k`` holds torchrun ranks
    ``k*per .. k*per+per-1``."""

    name: str
    nnodes: int
    per: int
    order: tuple[int, ...]

    def layout_rank(self, torchrun_rank: int) -> int:
        return self.order[torchrun_rank]

    def torchrun_rank(self, layout_rank: int) -> int:
        return self.order.index(layout_rank)

    def node_of(self, layout_rank: int) -> int:
        """The 0-based node (torchrun's group rank) that layout rank runs on."""
        return self.torchrun_rank(layout_rank) // self.per

    def ranks_on(self, node: int) -> tuple[int, ...]:
        """Layout ranks on `node`, sorted."""
        return tuple(sorted(self.order[node * self.per:(node + 1) * self.per]))

    def hosts_of(self, ranks: tuple[int, ...]) -> set[int]:
        return {self.node_of(r) for r in ranks}


def _local(layout: Layout, per: int, size: int, what: str, key) -> list[int]:
    if size > per:
        raise PlacementError(f"--placement {what}-local: an attention-{what.upper()} group of "
                             f"layout '{layout}' has {size} ranks, a host holds {per}")
    if per % size:
        raise PlacementError(f"--placement {what}-local: hosts of {per} rank(s) cannot hold "
                             f"whole attention-{what.upper()} groups of {size} (layout "
                             f"'{layout}')")
    return sorted(range(layout.world_size), key=key)


def _spread(layout: Layout, nnodes: int, per: int) -> list[int]:
    """Greedy: each rank, in layout order, goes to the host with room that has the fewest of
    its TP and CP peers already (ties: the next host round-robin), so groups cross hosts."""
    hosts: list[list[int]] = [[] for _ in range(nnodes)]
    for r in range(layout.world_size):
        c = layout.coords(r)
        tp_peers = {layout.rank_of(t, c.cp_rank, c.pp_rank) for t in range(layout.tp)}
        cp_peers = {layout.rank_of(c.tp_rank, q, c.pp_rank) for q in range(layout.cp)}

        def cost(k: int, c=c, tp_peers=tp_peers, cp_peers=cp_peers, r=r) -> tuple:
            mine = set(hosts[k])
            return (len(mine & tp_peers), len(mine & cp_peers), len(hosts[k]),
                    (k - r) % nnodes)

        k = min((k for k in range(nnodes) if len(hosts[k]) < per), key=cost)
        hosts[k].append(r)
    return [r for h in hosts for r in h]


def make_placement(name: str, layout: Layout | str, nnodes: int) -> Placement:
    """The placement `name` of `layout` over `nnodes` hosts, or PlacementError."""
    layout = Layout.parse(layout, max_world=None)
    if name not in PLACEMENTS:
        raise PlacementError(f"--placement {name!r}: choose from {', '.join(PLACEMENTS)}")
    if nnodes < 1 or layout.world_size % nnodes:
        raise PlacementError(f"layout '{layout}' has {layout.world_size} ranks, which {nnodes} "
                             "hosts cannot share evenly")
    per = layout.world_size // nnodes
    if name == "tp-local":
        order = _local(layout, per, layout.tp, "tp", lambda r: r)
    elif name == "cp-local":
        order = _local(layout, per, layout.cp, "cp",
                       lambda r: (layout.coords(r).pp_rank, layout.coords(r).tp_rank,
                                  layout.coords(r).cp_rank))
    elif name == "spread":
        order = _spread(layout, nnodes, per)
    else:
        order = list(range(layout.world_size))
    return Placement(name, nnodes, per, tuple(order))
