"""The observer seam: what the cache decided and which keys it touched, for a harness to check.

A no-op unless installed. Events are plain data so a harness can ship them between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class AckEffect(NamedTuple):
    """writing_check / loading_check: acks this rank popped for the agreed count, and how many
    were queued before."""

    popped: int
    queued: int

    @property
    def popped_per_value(self) -> tuple[int, ...]:
        return (self.popped,)


class DrainEffect(NamedTuple):
    """drain: items popped from each of the three control queues, in the agreed order."""

    revoked: int
    backup_acks: int
    host_released: int

    @property
    def popped_per_value(self) -> tuple[int, ...]:
        return (self.revoked, self.backup_acks, self.host_released)


class HitsEffect(NamedTuple):
    """prefetch_hits: whether this rank revoked, the pages it fetches, the pages it asked for."""

    revoked: int
    hit_pages: int
    requested_pages: int


class ProgressSeen(NamedTuple):
    """can_terminate: this rank's prefetch IO as it stood when it decided, whatever the policy."""

    queried: int
    revoked: int
    io_done: int
    completed: int
    hit_tokens: int
    elapsed: float

    @property
    def outstanding(self) -> bool:
        """IO still running: not queried yet, or neither revoked, finished nor complete."""
        return not self.queried or (not self.revoked and not self.io_done
                                    and self.completed < self.hit_tokens)


Effect = AckEffect | DrainEffect | HitsEffect | ProgressSeen
#: the effect type each decision kind carries (other kinds carry none)
EFFECT_OF_KIND: dict[str, type] = {"writing_check": AckEffect, "loading_check": AckEffect,
                                   "drain": DrainEffect, "prefetch_hits": HitsEffect,
                                   "can_terminate": ProgressSeen}


def effect_of(kind: str, values: tuple | list) -> Effect | tuple[()]:
    """The typed effect of a decision of `kind` from its plain values (as shipped in JSON)."""
    cls = EFFECT_OF_KIND.get(kind)
    return cls(*values) if cls is not None and values else ()


@dataclass(frozen=True)
class Decision:
    """One agreed decision. `channel` names the thread that took it, since decisions of
    different threads interleave freely; within a channel every rank must log the same list."""

    channel: str
    kind: str
    rid: str
    local: tuple[int, ...]
    agreed: tuple[int, ...]
    outcome: str
    #: what this rank did with the agreed value (acks popped, IO state seen): for an oracle
    effect: Effect | tuple[()] = ()


@dataclass(frozen=True)
class StorageAccess:
    op: str  # "get" | "set" | "exists"
    keys: tuple[str, ...]
    ok: tuple[bool, ...] = field(default=())
    checksums: tuple[str, ...] = field(default=())


class Observer:
    """Base class: every hook does nothing."""

    #: page checksums cost a hash of every byte moved: computed only for observers that ask
    wants_checksums = False

    def on_decision(self, decision: Decision) -> None:
        pass

    def on_tree_changed(self, channel: str, digest_fn) -> None:  # noqa: ANN001
        """Called after each scheduler decision that may change the tree; `digest_fn()` costs."""

    def on_storage(self, access: StorageAccess) -> None:
        pass

    def on_effect(self, kind: str, rid: str, values: tuple) -> None:
        """An action taken on an agreed value outside its decision (tokens a prefetch inserted)."""


NULL_OBSERVER = Observer()
