"""Per-rank recording: the observer the harness installs and a collective-call fingerprint.

The collective log is the same idea as PyTorch's desync debug (group, op, shape, dtype per
call), but kept for every run and compared after it, not only after a hang.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from reference.api import Decision, Observer, StorageAccess


class Recorder(Observer):
    wants_checksums = True

    def __init__(self) -> None:
        self.decisions: dict[str, list[list]] = defaultdict(list)
        self.digests: list[str] = []
        self.storage: list[list] = []
        #: per channel, parallel to `decisions`: what the rank did with each agreed value
        self.effects: dict[str, list[list]] = defaultdict(list)
        #: [kind, rid, values] of actions taken outside a decision (see scenarios/oracle.py)
        self.actions: list[list] = []
        self._lock = threading.Lock()

    def on_decision(self, d: Decision) -> None:
        with self._lock:
            self.decisions[d.channel].append([d.kind, d.rid, list(d.local), list(d.agreed), d.outcome])
            self.effects[d.channel].append(list(getattr(d, "effect", ())))

    def on_tree_changed(self, channel: str, digest_fn) -> None:  # noqa: ANN001
        self.digests.append(digest_fn())

    def on_storage(self, a: StorageAccess) -> None:
        with self._lock:
            self.storage.append([a.op, list(a.keys), list(a.ok), list(a.checksums)])

    def on_effect(self, kind: str, rid: str, values: tuple) -> None:
        with self._lock:
            self.actions.append([kind, rid, list(values)])

    def decision_count(self) -> int:
        return sum(len(v) for v in self.decisions.values())


class RecordingCollectives:
    """Wraps a Collectives; logs every call before making it, so a hang shows the pending call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.log: dict[str, list[str]] = defaultdict(list)
        #: per group, the rank-wide index of each call, to tell which divergence came first
        self.order: dict[str, list[int]] = defaultdict(list)
        self._count = 0
        self.pending: dict[str, str] = {}
        self._lock = threading.Lock()

    def new_groups(self, rank_sets: Sequence[tuple[int, ...]], tag: str) -> list[Any]:
        handles = self.inner.new_groups(rank_sets, tag)
        return [(f"{tag}{list(r)}", h) for r, h in zip(rank_sets, handles, strict=True)]

    def _log(self, name: str, entry: str) -> str:
        thread = threading.current_thread().name
        with self._lock:
            self.log[name].append(entry)
            self.order[name].append(self._count)
            self._count += 1
            self.pending[thread] = f"{entry} over {name}"
        return thread

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> None:
        name, handle = group
        thread = self._log(name, f"all_reduce {op.upper()} {_shape(tensor)} in {_call_site()}")
        self.inner.all_reduce(tensor, op, handle)
        with self._lock:
            self.pending.pop(thread, None)

    def forward(self, tensor: torch.Tensor, src: int, group: Any) -> None:
        """PP rank 0 sends, the others receive: logged alike on both ends, so they compare."""
        name, handle = group
        thread = self._log(name, f"forward {_shape(tensor)} from rank {src} in {_call_site()}")
        self.inner.forward(tensor, src, handle)
        with self._lock:
            self.pending.pop(thread, None)


def _shape(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


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
