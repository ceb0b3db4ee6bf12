"""The observer seam: what the cache decided and which keys it touched, for a harness to check.

A no-op unless installed. Events are plain data so a harness can ship them between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    effect: tuple = ()


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
