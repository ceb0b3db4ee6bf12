"""What one rank reports after a run, as typed records: the checker, the oracle, coverage,
explore and soak read attributes, never dict keys or positions.

Both systems under test build the same `RankResult` (scenarios/sut/reference_rank.py for the reference,
scenarios/sut/sglang/rank.py for SGLang). Records are frozen, slotted module-level dataclasses, so
they pickle from torchrun workers as they are. The recorder's hot path keeps appending plain
tuples; records are built once, at the end of a run (`Decision.of`, `CollectiveCall.of`).

A rank's error carries an `ErrorKind` taken from the exception's TYPE where it was caught
(`RankError.of`), never from the words of its message: the checker names a rank that failed on
its own before the peers that only waited for it.
"""

from __future__ import annotations

import dataclasses
import operator
import traceback
from dataclasses import dataclass, field
from typing import Any

from reference.api import AgreementTimeout, Effect, effect_of
from scenarios.core.errors import ErrorKind

Values = tuple[int | None, ...]  # None: a value this SUT does not expose (SGLang)


def _compact(cls: type) -> type:
    """Pickle as (class, field values): the default for a frozen slotted dataclass goes through
    Python-level __getstate__ / __setstate__ and costs several times more per record."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    get = operator.attrgetter(*names)
    if len(names) == 1:
        cls.__reduce__ = lambda self: (cls, (get(self),))  # type: ignore[method-assign]
    else:
        cls.__reduce__ = lambda self: (cls, get(self))  # type: ignore[method-assign]
    return cls


def error_kind(exc: BaseException) -> ErrorKind:
    """The kind of an exception that ended a rank's run, from its type: the harness's own carry
    `rank_kind` (scenarios/core/errors.py); the reference's AgreementTimeout is a wait. The
    exception itself is tried first, then its explicit cause (`raise ... from e`: a dead IO
    thread behind HiCacheError). Any other exception is this rank's own failure."""
    seen: BaseException | None = exc
    for _ in range(8):  # an explicit cause chain is short; never loop on a cycle
        if seen is None:
            break
        kind = getattr(type(seen), "rank_kind", None)
        if isinstance(kind, ErrorKind):
            return kind
        if isinstance(seen, AgreementTimeout):
            return ErrorKind.WAITED
        seen = seen.__cause__
    return ErrorKind.FAILED


@_compact
@dataclass(frozen=True, slots=True)
class RankError:
    kind: ErrorKind
    type: str  # the exception's class name
    message: str
    #: what the harness was doing when it happened, for an infrastructure error
    where: str = ""
    traceback: str = ""

    @classmethod
    def of(cls, exc: BaseException, kind: ErrorKind | None = None, where: str = "") -> RankError:
        """From the exception being handled (call inside its `except`)."""
        return cls(kind or error_kind(exc), type(exc).__name__, str(exc), where,
                   traceback.format_exc(limit=8))

    @property
    def waited(self) -> bool:
        """It only says a peer never came (or the run was stopped): a consequence, not a cause."""
        return self.kind in (ErrorKind.WAITED, ErrorKind.STOPPED)

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@_compact
@dataclass(frozen=True, slots=True)
class Decision:
    """One agreed decision of one channel. `local` legitimately differs between ranks; every
    rank of a channel must log the same (kind, rid, agreed, outcome)."""

    kind: str
    rid: str
    local: Values
    agreed: Values
    outcome: str

    @classmethod
    def of(cls, t: tuple) -> Decision:
        kind, rid, local, agreed, outcome = t
        return cls(kind, rid, tuple(local), tuple(agreed), outcome)

    def decided(self) -> tuple:
        """What ranks must agree on: everything but the local value."""
        return (self.kind, self.rid, self.agreed, self.outcome)

    def __str__(self) -> str:
        return f"{self.kind}({self.rid}) agreed={list(self.agreed)} -> {self.outcome}"


@_compact
@dataclass(frozen=True, slots=True)
class CollectiveCall:
    """One call as RecordingCollectives logs it before making it: what must match on every
    member of its group (PyTorch's desync-debug fingerprint) plus the reference function that
    issued it (`site`, empty for SGLang), so a mispaired call is named."""

    op: str  # "all_reduce MAX", "forward", "barrier", ...
    shape: tuple[int, ...] | None = None
    dtype: str = ""
    src: int | None = None  # forward: the sending rank
    site: str = ""

    @classmethod
    def of(cls, t: tuple) -> CollectiveCall:
        return cls(*t)

    def __str__(self) -> str:
        text = self.op
        if self.shape is not None:
            text += f" {list(self.shape)} {self.dtype}"
        if self.src is not None:
            text += f" from rank {self.src}"
        return text + (f" in {self.site}" if self.site else "")


@_compact
@dataclass(frozen=True, slots=True)
class StorageCall:
    op: str  # "get" | "set" | "exists"
    keys: tuple[str, ...]
    ok: tuple[bool, ...] = ()
    checksums: tuple[str, ...] = ()


@_compact
@dataclass(frozen=True, slots=True)
class Action:
    """An action on an agreed value taken outside its decision (tokens a prefetch inserted)."""

    kind: str
    rid: str
    values: tuple


@_compact
@dataclass(frozen=True, slots=True)
class Eviction:
    kind: str  # "evict_device" | "evict_host"
    busy: bool  # IO or requests in flight when it ran
    #: the pages resident after it ran, "HASH:DH" per page (client/residency.py), sorted;
    #: None where the SUT cannot report it. Differential mode compares these.
    resident: tuple[str, ...] | None = None


@_compact
@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request got; equal across CP peers when they agree."""

    rid: str
    status: str  # "done" | "aborted" | "rejected"
    device_hit: int = 0
    host_hit: int = 0
    computed: int = 0
    bad_pages: tuple[int, ...] = ()

    @classmethod
    def of(cls, o: Any) -> Outcome:
        """From reference's RequestOutcome or SGLang's driver dict."""
        d = o if isinstance(o, dict) else dataclasses.asdict(o)
        return cls(d["rid"], d["status"], int(d.get("device_hit", 0)), int(d.get("host_hit", 0)),
                   int(d.get("computed", 0)), tuple(d.get("bad_pages", ())))


@_compact
@dataclass(frozen=True, slots=True)
class Recorded:
    """A free-running run's choices and faults, as a Schedule replays them."""

    choices: tuple[int, ...]
    faults: tuple[tuple[str, int], ...]


@_compact
@dataclass(frozen=True, slots=True)
class Snapshot:
    """A rank's accounting after the drain, as every SUT reports it: what the leak checks
    compare (every slot in use is held by the tree or in flight) and what the run ran on."""

    tree_digest: str = ""
    device_used: int = 0
    host_used: int = 0
    tree_device_tokens: int = 0
    tree_host_tokens: int = 0
    in_flight: dict[str, Any] = field(default_factory=dict)
    busy: bool = False
    device: str = "cpu"
    host_pinned: bool = False
    cuda_event_acks: bool = False
    #: the cache class the SGLang SUT built ("" on the reference)
    cache_class: str = ""
    #: Mooncake runs of the SGLang SUT: the client's settings, and (rank 0) the run's keys
    #: the master lists
    mooncake_client: dict[str, Any] | None = None
    mooncake_master_keys: tuple[str, ...] = ()

    @classmethod
    def of(cls, d: dict[str, Any]) -> Snapshot:
        """From a SUT's own accounting dict (the reference scheduler's `snapshot()`, the SGLang
        driver's); a key this record does not know is a programming error, not data to drop."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"snapshot keys this record does not know: {sorted(unknown)}")
        return cls(**{**d, "mooncake_master_keys": tuple(d.get("mooncake_master_keys", ()))})


@_compact
@dataclass(frozen=True, slots=True)
class RankResult:
    rank: int
    coords: tuple[int, int, int] = (0, 0, 0)  # (tp, cp, pp)
    #: per channel; every rank of a channel must log the same decided() sequence
    decisions: dict[str, tuple[Decision, ...]] = field(default_factory=dict)
    #: per channel, parallel to `decisions`: what this rank did with each agreed value (a typed
    #: effect of the reference's observer seam; () where a decision or a SUT has none)
    effects: dict[str, tuple[Effect | tuple[()], ...]] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()
    evictions: tuple[Eviction, ...] = ()
    digests: tuple[str, ...] = ()  # radix-tree digest after every scheduler decision
    collectives: dict[str, tuple[CollectiveCall, ...]] = field(default_factory=dict)
    #: per group, the rank-wide index of each call, to tell which divergence came first
    collective_order: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pending_collectives: dict[str, str] = field(default_factory=dict)  # thread -> call
    storage: tuple[StorageCall, ...] = ()
    stored: tuple[str, ...] = ()  # keys this rank wrote that the store still held at the end
    outcomes: tuple[Outcome, ...] = ()
    snapshot: Snapshot | None = None  # accounting after the drain; None: never taken
    error: RankError | None = None
    ops_done: int = 0
    waiting_on: dict[str, str] = field(default_factory=dict)  # thread -> gate
    wall_s: float = 0.0
    recorded: Recorded | None = None  # free-running runs only
    sut: str = "reference"
    pacer_trace: tuple = ()
    nemesis_injected: dict[str, int] = field(default_factory=dict)
    #: gated runs only: storage calls a soak's nemesis failed, as (call, seq) (its replay
    #: Schedule scripts them as `faults`)
    injected_faults: tuple[tuple[str, int], ...] = ()
    #: the SGLang SUT: where this rank imported `sglang` from (a tree must be what ran), and
    #: what SGLang's own rank-consensus checker said when it was on (sut/sglang/consensus.py)
    sglang_package: str = ""
    consensus_checker: dict[str, Any] | None = None
    #: where the run's time went, seconds per phase (SGLang: building and shutting down the cache)
    phase_s: dict[str, float] = field(default_factory=dict)

    @property
    def infrastructure(self) -> str | None:
        """What broke outside the system under test (a verdict of `unknown`), if anything."""
        e = self.error
        if e is None or e.kind is not ErrorKind.INFRASTRUCTURE:
            return None
        return f"{e.where}: {e}" if e.where else str(e)

    def decision_count(self) -> int:
        return sum(len(v) for v in self.decisions.values())

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (lists, dicts, strings), for a file or `--json`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankResult:
        """Inverse of to_json; also reads the dict results of older commits (error as text,
        decisions and storage as lists)."""
        err = d.get("error")
        if isinstance(err, str):  # an old result: the text was all there was
            typ, _, msg = err.partition(": ")
            infra = d.get("infrastructure")
            err = RankError(ErrorKind.INFRASTRUCTURE if infra else ErrorKind.FAILED, typ, msg,
                            "", str(d.get("snapshot", {}).get("traceback", "")))
        elif isinstance(err, dict):
            err = RankError(**{**err, "kind": ErrorKind(err["kind"])})

        def seq(v: Any) -> dict:
            return v if isinstance(v, dict) else dataclasses.asdict(v)

        def call(c: Any) -> CollectiveCall:
            return CollectiveCall(**{**c, "shape": None if c.get("shape") is None
                                     else tuple(c["shape"])}) if isinstance(c, dict) \
                else CollectiveCall(str(c))

        rec = d.get("recorded")
        snap = {k: v for k, v in (d.get("snapshot") or {}).items()
                if k not in ("traceback", "harness_error")}  # older results kept these here
        decisions = {ch: tuple(Decision.of((x["kind"], x["rid"], x["local"], x["agreed"],
                                            x["outcome"]) if isinstance(x, dict) else x)
                               for x in v) for ch, v in d.get("decisions", {}).items()}

        def effects(ch: str, v: list) -> tuple[Effect | tuple[()], ...]:
            kinds = [x.kind for x in decisions.get(ch, ())]
            return tuple(effect_of(kinds[i] if i < len(kinds) else "", e)
                         for i, e in enumerate(v))

        return cls(
            rank=int(d["rank"]), coords=tuple(d.get("coords", (0, 0, 0))),  # type: ignore[arg-type]
            decisions=decisions,
            effects={ch: effects(ch, v) for ch, v in d.get("effects", {}).items()},
            actions=tuple(Action(a["kind"], a["rid"], tuple(a["values"])) if isinstance(a, dict)
                          else Action(a[0], a[1], tuple(a[2])) for a in d.get("actions", ())),
            evictions=tuple(Eviction(**{**e, "resident": None if e.get("resident") is None
                                            else tuple(e["resident"])})
                            if isinstance(e, dict) else Eviction(e[0], bool(e[1]))
                            for e in d.get("evictions", ())),
            digests=tuple(d.get("digests", ())),
            collectives={g: tuple(call(c) for c in v)
                         for g, v in d.get("collectives", {}).items()},
            collective_order={g: tuple(v) for g, v in d.get("collective_order", {}).items()},
            pending_collectives=dict(d.get("pending_collectives", {})),
            storage=tuple(StorageCall(x["op"], tuple(x["keys"]), tuple(x["ok"]),
                                      tuple(x["checksums"])) if isinstance(x, dict)
                          else StorageCall(x[0], tuple(x[1]), tuple(x[2]), tuple(x[3]))
                          for x in d.get("storage", ())),
            stored=tuple(d.get("stored", ())),
            outcomes=tuple(Outcome.of(o) for o in d.get("outcomes", ())),
            snapshot=Snapshot.of(snap) if snap and "device_used" in snap else None, error=err, ops_done=int(d.get("ops_done", 0)),
            waiting_on=dict(d.get("waiting_on", {})), wall_s=float(d.get("wall_s", 0.0)),
            recorded=None if rec is None else Recorded(
                tuple(seq(rec)["choices"]), tuple((str(c), int(n)) for c, n in seq(rec)["faults"])),
            sut=str(d.get("sut", "reference")), pacer_trace=tuple(map(tuple, d.get("pacer_trace", ()))),
            nemesis_injected=dict(d.get("nemesis_injected", {})),
            injected_faults=tuple((str(c), int(n)) for c, n in d.get("injected_faults", ())),
        )
