"""Parallel layout (attention TP x attention CP x PP) and the rank groups it implies.

Ranks are numbered ``rank = pp_rank * (tp * cp) + cp_rank * tp + tp_rank``: attention-TP peers
are contiguous, CP peers are ``tp`` apart, and one pipeline stage is a contiguous block of
``tp * cp`` ranks (the full TP group, which the attention TP and CP groups tile as a grid).
Everything here is pure arithmetic so schedules, the in-process runner and the torchrun workers
all derive the same groups, in the same order, from the same three numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

from scenarios.core.errors import LayoutError

__all__ = [
    "GROUP_KINDS",
    "MAX_WORLD",
    "GroupKind",
    "Layout",
    "LayoutError",
    "RankCoords",
]

#: Default ceiling for :meth:`Layout.parse`; far above anything one host runs, it exists so a
#: typo such as ``"22x2"`` fails at parse time instead of trying to start 44 processes.
MAX_WORLD = 64

GroupKind = Literal["attn_tp", "attn_cp", "tp", "pp"]
#: Group kinds in the order their process groups are created (every rank must use this order).
GROUP_KINDS: tuple[GroupKind, ...] = ("attn_tp", "attn_cp", "tp", "pp")

_LAYOUT_RE = re.compile(r"^\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*(?:[xX]\s*(-?\d+)\s*)?$")


class RankCoords(NamedTuple):
    """Position of one rank in the (tp, cp, pp) grid."""

    tp_rank: int
    cp_rank: int
    pp_rank: int


@dataclass(frozen=True)
class Layout:
    """Sizes of the attention-TP, attention-CP and pipeline dimensions (all >= 1).

    ``str(layout)`` gives ``"TxC"`` (or ``"TxCxP"`` when ``pp > 1``) and round-trips through
    :meth:`parse`, so a layout is stored in schedules and replay files as that string.
    """

    tp: int
    cp: int
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LayoutError(f"layout {name}={value!r}: sizes must be positive integers")
            if value < 1:
                raise LayoutError(
                    f"layout tp={self.tp} cp={self.cp} pp={self.pp}: "
                    f"sizes must be positive integers, got {name}={value}"
                )

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | Layout, *, max_world: int | None = MAX_WORLD) -> Layout:
        """Parse ``"TPxCP"`` or ``"TPxCPxPP"`` (e.g. ``"2x2"``, ``"2x2x2"``); check ``max_world``.

        A :class:`Layout` passes through (still checked against ``max_world``), so callers can
        accept either form.
        """
        if isinstance(text, Layout):
            layout = text
        else:
            if not isinstance(text, str):
                raise LayoutError(f"unknown layout {text!r}: expected TPxCP or TPxCPxPP, e.g. 2x2")
            m = _LAYOUT_RE.match(text)
            if m is None:
                raise LayoutError(f"unknown layout {text!r}: expected TPxCP or TPxCPxPP, e.g. 2x2")
            tp, cp = int(m.group(1)), int(m.group(2))
            pp = int(m.group(3)) if m.group(3) is not None else 1
            for name, value in (("tp", tp), ("cp", cp), ("pp", pp)):
                if value < 1:
                    raise LayoutError(
                        f"layout {text.strip()!r}: sizes must be positive integers, "
                        f"got {name}={value}"
                    )
            layout = cls(tp, cp, pp)
        if max_world is not None:
            layout.check_world(max_world)
        return layout

    def check_world(self, max_world: int, *, what: str = "max_world") -> None:
        """Raise :class:`LayoutError` if this layout needs more than ``max_world`` ranks."""
        if self.world_size > max_world:
            raise LayoutError(
                f"layout '{self}' needs {self.world_size} ranks, above the limit of "
                f"{max_world} ({what})"
            )

    def __str__(self) -> str:
        return f"{self.tp}x{self.cp}" + (f"x{self.pp}" if self.pp != 1 else "")

    # -- sizes and coordinates -------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Number of ranks: ``tp * cp * pp``."""
        return self.tp * self.cp * self.pp

    @property
    def tp_group_size(self) -> int:
        """Size of the full TP group (one pipeline stage): ``tp * cp``."""
        return self.tp * self.cp

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise LayoutError(
                f"rank {rank!r} is outside layout '{self}' (world size {self.world_size})"
            )

    def rank_of(self, tp_rank: int, cp_rank: int, pp_rank: int = 0) -> int:
        """Global rank of grid position (tp_rank, cp_rank, pp_rank)."""
        for name, value, size in (
            ("tp_rank", tp_rank, self.tp),
            ("cp_rank", cp_rank, self.cp),
            ("pp_rank", pp_rank, self.pp),
        ):
            if not 0 <= value < size:
                raise LayoutError(f"{name}={value} is outside layout '{self}' (size {size})")
        return pp_rank * self.tp_group_size + cp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> RankCoords:
        """Grid position of ``rank``."""
        self._check_rank(rank)
        pp_rank, rest = divmod(rank, self.tp_group_size)
        cp_rank, tp_rank = divmod(rest, self.tp)
        return RankCoords(tp_rank, cp_rank, pp_rank)

    def tp_rank(self, rank: int) -> int:
        """Rank within the attention-TP group."""
        return self.coords(rank).tp_rank

    def cp_rank(self, rank: int) -> int:
        """Rank within the attention-CP group."""
        return self.coords(rank).cp_rank

    def pp_rank(self, rank: int) -> int:
        """Pipeline stage of ``rank``."""
        return self.coords(rank).pp_rank

    # -- groups ----------------------------------------------------------------------------

    def attn_tp_group(self, rank: int) -> tuple[int, ...]:
        """Ranks sharing ``rank``'s CP and PP position (size ``tp``), ascending."""
        _, c, p = self.coords(rank)
        return tuple(self.rank_of(t, c, p) for t in range(self.tp))

    def attn_cp_group(self, rank: int) -> tuple[int, ...]:
        """Ranks sharing ``rank``'s TP and PP position (size ``cp``), ascending."""
        t, _, p = self.coords(rank)
        return tuple(self.rank_of(t, c, p) for c in range(self.cp))

    def tp_group(self, rank: int) -> tuple[int, ...]:
        """The full TP group: ``rank``'s pipeline stage (size ``tp * cp``), ascending."""
        p = self.coords(rank).pp_rank
        start = p * self.tp_group_size
        return tuple(range(start, start + self.tp_group_size))

    def pp_group(self, rank: int) -> tuple[int, ...]:
        """Ranks sharing ``rank``'s TP and CP position (size ``pp``), ascending."""
        t, c, _ = self.coords(rank)
        return tuple(self.rank_of(t, c, p) for p in range(self.pp))

    def group(self, kind: GroupKind, rank: int) -> tuple[int, ...]:
        """Ranks of ``rank``'s group of the given kind."""
        if kind == "attn_tp":
            return self.attn_tp_group(rank)
        if kind == "attn_cp":
            return self.attn_cp_group(rank)
        if kind == "tp":
            return self.tp_group(rank)
        if kind == "pp":
            return self.pp_group(rank)
        raise LayoutError(f"unknown group kind {kind!r}: expected one of {', '.join(GROUP_KINDS)}")

    def groups(self, kind: GroupKind) -> list[tuple[int, ...]]:
        """Every group of one kind (a partition of all ranks), ordered by lowest rank."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in range(self.world_size):
            seen.setdefault(self.group(kind, rank), None)
        return sorted(seen, key=lambda g: g[0])

    def all_groups(self) -> list[tuple[GroupKind, tuple[int, ...]]]:
        """Every group of every kind, in the order all ranks must call ``new_group``.

        Kinds follow :data:`GROUP_KINDS`, groups within a kind ascend by lowest rank. Groups of
        different kinds with the same rank set (e.g. attn-CP and TP in ``1x2``) are listed once
        per kind on purpose: each kind gets its own communicator, as in SGLang, so collectives
        issued on two kinds from two threads never interleave on one process group.
        Single-rank groups are included; consumers decide whether to skip them.
        """
        return [(kind, ranks) for kind in GROUP_KINDS for ranks in self.groups(kind)]
