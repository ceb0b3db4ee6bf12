"""Per-rank recording: the observer the harness installs and a collective-call fingerprint.

The collective log is the same idea as PyTorch's desync debug (group, op, shape, dtype per
call), but kept for every run and compared after it, not only after a hang.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from reference.api import Decision, Effect, Observer, StorageAccess, TorchCollectives
from scenarios.core import records
from scenarios.core.errors import CollectiveError


class Recorder(Observer):
    """Appends plain tuples on the hot path; `decisions_records()` etc. build the typed
    records of scenarios/core/records.py once, at the end of the run."""

    wants_checksums = True

    def __init__(self) -> None:
        #: per channel: (kind, rid, local, agreed, outcome)
        self.decisions: dict[str, list[tuple]] = defaultdict(list)
        self.digests: list[str] = []
        self.storage: list[StorageAccess] = []
        #: per channel, parallel to `decisions`: what the rank did with each agreed value
        self.effects: dict[str, list[Effect | tuple[()]]] = defaultdict(list)
        #: (kind, rid, values) of actions taken outside a decision (see scenarios/judge/oracle.py)
        self.actions: list[tuple] = []
        self._lock = threading.Lock()

    def on_decision(self, d: Decision) -> None:
        with self._lock:
            self.decisions[d.channel].append((d.kind, d.rid, d.local, d.agreed, d.outcome))
            self.effects[d.channel].append(d.effect)

    def on_tree_changed(self, channel: str, digest_fn) -> None:  # noqa: ANN001
        self.digests.append(digest_fn())

    def on_storage(self, a: StorageAccess) -> None:
        with self._lock:
            self.storage.append(a)

    def on_effect(self, kind: str, rid: str, values: tuple) -> None:
        with self._lock:
            self.actions.append((kind, rid, tuple(values)))

    def decision_count(self) -> int:
        return sum(len(v) for v in self.decisions.values())

    # -- the records, at the end of a run --------------------------------------------------
    def decision_records(self) -> dict[str, tuple[records.Decision, ...]]:
        return {ch: tuple(map(records.Decision.of, v)) for ch, v in self.decisions.items()}

    def effect_records(self) -> dict[str, tuple[Effect | tuple[()], ...]]:
        return {ch: tuple(v) for ch, v in self.effects.items()}

    def action_records(self) -> tuple[records.Action, ...]:
        return tuple(records.Action(*a) for a in self.actions)

    def storage_records(self) -> tuple[records.StorageCall, ...]:
        return tuple(records.StorageCall(a.op, tuple(a.keys), tuple(a.ok), tuple(a.checksums))
                     for a in self.storage)


class CollectiveLog:
    """Every collective call of one rank's run, logged before it is made: per group the calls in
    order, the rank-wide index of each (which divergence came first), and the call each thread
    has not returned from (a hang, or a failure, names its call). torch.distributed reports a
    failed collective (gloo timeout, peer gone) as a bare RuntimeError: with `typed_errors`, it
    becomes CollectiveError here, where the call is known. Both SUTs' recorders write here."""

    def __init__(self, typed_errors: bool = True) -> None:
        self.log: dict[str, list[records.CollectiveCall]] = defaultdict(list)
        self.order: dict[str, list[int]] = defaultdict(list)
        self.pending: dict[str, tuple[records.CollectiveCall, str]] = {}  # thread -> call
        self._count = 0
        self._lock = threading.Lock()
        self._typed_errors = typed_errors

    @contextmanager
    def call(self, group: str, call: records.CollectiveCall) -> Iterator[None]:
        """Log `call` on `group`, then run the body (the call itself). A call that raised stays
        pending: what the rank was in when it failed."""
        thread = threading.current_thread().name
        with self._lock:
            self.log[group].append(call)
            self.order[group].append(self._count)
            self._count += 1
            self.pending[thread] = (call, group)
        # the error names the call's kind only: its shape and site are in the pending call
        with self.typed_errors(f"{call.op.split()[0]} over {group}"):
            yield
        with self._lock:
            self.pending.pop(thread, None)

    @contextmanager
    def typed_errors(self, what: str) -> Iterator[None]:
        """A bare RuntimeError of the body (gloo's) becomes CollectiveError naming `what`."""
        try:
            yield
        except RuntimeError as e:
            if self._typed_errors and type(e) is RuntimeError:
                raise CollectiveError(f"{what}: {e}") from e
            raise

    # -- the records, at the end of a run --------------------------------------------------
    def call_records(self) -> dict[str, tuple[records.CollectiveCall, ...]]:
        return {g: tuple(v) for g, v in self.log.items()}

    def order_records(self) -> dict[str, tuple[int, ...]]:
        return {g: tuple(v) for g, v in self.order.items()}

    def pending_text(self) -> dict[str, str]:
        """thread -> "call over group" for every call that had not returned."""
        return {t: f"{c} over {g}" for t, (c, g) in self.pending.items()}


class RecordingCollectives:
    """Wraps a Collectives; logs every call in a CollectiveLog before making it, so a hang
    shows the pending call and a failed torch collective becomes a CollectiveError naming it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.calls = CollectiveLog(typed_errors=isinstance(inner, TorchCollectives))
        self.call_records = self.calls.call_records
        self.order_records = self.calls.order_records
        self.pending_text = self.calls.pending_text

    def new_groups(self, rank_sets: Sequence[tuple[int, ...]], tag: str) -> list[Any]:
        with self.calls.typed_errors(f"new_groups over {tag}"):
            handles = self.inner.new_groups(rank_sets, tag)
        return [(f"{tag}{list(r)}", h) for r, h in zip(rank_sets, handles, strict=True)]

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        name, handle = group
        with self.calls.call(name, records.CollectiveCall(
                f"all_reduce {op.upper()}", tuple(tensor.shape), _dtype(tensor), None,
                _call_site())):
            self.inner.all_reduce(tensor, op, handle)

    def forward(self, tensor: torch.Tensor, src: int, group: Any) -> None:
        """PP rank 0 sends, the others receive: logged alike on both ends, so they compare."""
        name, handle = group
        with self.calls.call(name, records.CollectiveCall(
                "forward", tuple(tensor.shape), _dtype(tensor), src, _call_site())):
            self.inner.forward(tensor, src, handle)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


_SYNC_FILE = "sync.py"


def _call_site() -> str:
    """The reference function that issued the collective (e.g. `writing_check`), so a
    mispaired call is named, as PyTorch's desync debug names the pending call."""
    f = sys._getframe(2)
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        if "/reference/" in path and not path.endswith(_SYNC_FILE):
            return f.f_code.co_name
        f = f.f_back
    return "?"
