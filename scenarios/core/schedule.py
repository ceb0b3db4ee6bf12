"""A Schedule: the complete, JSON-serialisable description of one run.

Everything that differs between ranks in production (how far each IO thread got at each
decision point, which storage calls fail, whose clock runs ahead) is an explicit value here,
so the same Schedule always produces the same run on the same code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from reference.api import (
    DEFAULT_PROFILE,
    STOP_POLICIES,
    STORAGE_BACKENDS,
    TOKEN_ID_LIMIT,
    WRITE_POLICIES,
    CacheConfig,
    UnknownProfileError,
    UnknownVariantError,
    check_variant,
    get_profile,
)
from scenarios.core import suts
from scenarios.core.errors import FieldProblem, NotAtThisCommit, ScheduleError, UsageError
from scenarios.core.layout import Layout, LayoutError

SCHEDULE_VERSION = 1
#: what SGLang can hash: a token id is a 4-byte unsigned integer in its page hashes
TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]
Backend = Literal[STORAGE_BACKENDS]  # type: ignore[valid-type]  # names from reference.api
#: the storage calls a Schedule may fail (reference/cache_controller.py asks the pacer for these)
#: a call that a Schedule's faults can fail on one rank: a storage call, "host_alloc" (this
#: rank's host pool refuses a write-through: host memory pressure on a subset of ranks, which
#: SGLang 0.5.14 names as why `writing_check` may no longer return early) or "prefetch_alloc"
#: (it refuses a storage prefetch's host pages: in `prefetch_from_storage` to 0.5.15, at the
#: drain that allocates the agreed hit from 0.5.16)
StorageCall = Literal["exists", "get", "set", "host_alloc", "prefetch_alloc"]
#: fields that name something that exists only at some commits (a replay file from a newer
#: commit may name a variant, profile or SUT this one does not know: cannot judge, not bad input)
NAMED_AT_SOME_COMMITS = ("variant", "protocol", "sut")


#: the reference's own defaults: a Schedule's cache settings default to exactly these
_CACHE = CacheConfig()


class CachePolicy(BaseModel):
    """The cache settings of a Schedule: `reference.api.CacheConfig`'s, with its defaults and
    its policy names (one definition, in reference/), except the prefetch timeout, which a
    Schedule counts in pacer ticks (seconds follow from the mode: scenarios/sut/reference_rank.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    page_size: int = Field(_CACHE.page_size, ge=1, le=64)
    device_pages: int = Field(_CACHE.device_pages, ge=1)
    host_pages: int = Field(_CACHE.host_pages, ge=1)
    mla: bool = _CACHE.kv.is_mla
    write_policy: Literal[WRITE_POLICIES] = _CACHE.write_policy  # type: ignore[valid-type]
    prefetch_stop_policy: Literal[STOP_POLICIES] = (  # type: ignore[valid-type]
        _CACHE.prefetch_stop_policy)
    prefetch_threshold: int = Field(_CACHE.prefetch_threshold, ge=0)
    prefetch_batch_pages: int = Field(_CACHE.prefetch_batch_pages, ge=1)
    prefetch_timeout_ticks: int = Field(3, ge=0)


class Op(BaseModel):
    """One scheduler-level action that every rank performs in the same order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: "decode_add": a request arriving at the decode server of a PD-disaggregated deployment
    #: (its KV comes from a prefill server; the prefix the decode side holds on device, host or
    #: storage is restored locally through HiCache: SGLang's decode_hicache_mixin, 0.5.13+)
    kind: Literal["add", "step", "abort", "evict_device", "evict_host", "decode_add"]
    rid: str | None = Field(None, min_length=1)
    tokens: list[TokenId] | None = Field(None, min_length=1)
    n: int | None = Field(None, ge=0)
    prefetch: bool = True

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Op:
        if self.kind in ("add", "decode_add") and (self.rid is None or self.tokens is None):
            raise ValueError(f"an '{self.kind}' op needs rid and tokens")
        if self.kind == "abort" and self.rid is None:
            raise ValueError("an 'abort' op needs rid")
        if self.kind in ("evict_device", "evict_host") and self.n is None:
            raise ValueError(f"an '{self.kind}' op needs n")
        return self


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = SCHEDULE_VERSION
    name: str = "unnamed"
    layout: str = "1x2"
    variant: str = "fixed"
    #: which SGLang release's agreement protocol the reference follows (reference/profiles.py)
    protocol: str = DEFAULT_PROFILE
    #: SGLang's --enable-dp-attention (the cache's TP group and the TP rank in MHA keys)
    dp_attention: bool = True
    backend: Backend = "memory"
    cache: CachePolicy = CachePolicy()
    ops: list[Op] = Field(default_factory=list)
    #: per rank: one integer per pacer decision point, consumed in order (missing = all done)
    choices: dict[NonNegativeInt, list[NonNegativeInt]] = Field(default_factory=dict)
    #: per rank: calls that fail there, as [call, seq]: "exists" | "get" | "set" (the n-th
    #: storage call of that kind), "host_alloc" (the n-th write_backup finds no host memory) or
    #: "prefetch_alloc" (the n-th prefetch that allocates host pages finds none)
    faults: dict[NonNegativeInt, list[tuple[StorageCall, NonNegativeInt]]] = Field(
        default_factory=dict)
    #: per rank: ticks its clock runs ahead (prefetch timeouts are local)
    clock_skew: dict[NonNegativeInt, NonNegativeInt] = Field(default_factory=dict)
    seed: int = 0
    #: the system under test: "reference", "sglang==VERSION" or "sglang@PATH" (core/suts.py)
    sut: str = suts.REFERENCE

    @field_validator("sut")
    @classmethod
    def _sut(cls, v: str) -> str:
        try:
            return suts.check(v)
        except UsageError as e:
            raise ValueError(str(e)) from None

    @field_validator("layout")
    @classmethod
    def _layout(cls, v: str) -> str:
        try:
            return str(Layout.parse(v))
        except LayoutError as e:
            raise ValueError(str(e)) from None

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        try:
            return check_variant(v)  # reference's one check and message
        except UnknownVariantError as e:
            raise NotAtThisCommit(str(e)) from None

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        try:
            return get_profile(v).name
        except UnknownProfileError as e:
            raise NotAtThisCommit(str(e)) from None

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > SCHEDULE_VERSION:
            raise NotAtThisCommit(f"schedule version {v} is newer than this cpcheck reads "
                                  f"({SCHEDULE_VERSION})")
        if v != SCHEDULE_VERSION:
            raise ValueError(f"schedule version {v} is not supported (this cpcheck reads {SCHEDULE_VERSION})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Schedule:
        """Ops to run, unique request ids, and per-rank fields only for ranks of the layout."""
        if not self.ops:
            raise FieldProblem(("ops",), "no ops: a schedule must do something")
        seen: set[str] = set()
        for i, op in enumerate(self.ops):
            if op.kind in ("add", "decode_add"):
                if op.rid in seen:
                    raise FieldProblem(("ops", i, "rid"), f"duplicate request id '{op.rid}'")
                seen.add(op.rid or "")
            elif op.kind == "abort" and op.rid not in seen:  # would run to a vacuous agree
                raise FieldProblem(("ops", i, "rid"), f"abort of request id '{op.rid}' that "
                                   "no earlier op added")
        world = Layout.parse(self.layout).world_size
        for name in ("choices", "faults", "clock_skew"):
            bad = sorted(r for r in getattr(self, name) if r >= world)
            if bad:
                raise FieldProblem((name, bad[0]), f"rank {bad[0]} is outside layout "
                                   f"{self.layout} (ranks 0..{world - 1})")
        return self

    @property
    def layout_obj(self) -> Layout:
        return Layout.parse(self.layout)

    def with_(self, **changes) -> Schedule:  # noqa: ANN003
        return self.model_validate({**self.model_dump(), **changes})

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict, source: str = "<schedule>") -> Schedule:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err: Any = e.errors()[0]
            loc = tuple(err["loc"])
            cause = (err.get("ctx") or {}).get("error")
            if not loc and isinstance(cause, FieldProblem):
                loc = cause.loc
            where = ".".join(str(p) for p in loc) or "(top level)"
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise ScheduleError(f"{source}: field '{where}': {msg}", loc, err["type"],
                                cause if isinstance(cause, BaseException) else None) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> Schedule:
        data = read_json(path, "file")
        if isinstance(data, dict) and "schedule" in data:
            data = data["schedule"]
        return cls.from_dict(data, str(path))

    def num_steps(self) -> int:
        return len(self.ops)


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's data; a missing, unreadable, empty or malformed file is a ScheduleError
    (exit 2) naming the file and, for bad JSON, the line. `what` names the file in the error
    ("replay file", "file")."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ScheduleError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(f"{path}: cannot read ({type(e).__name__})") from None
    if not text.strip():
        raise ScheduleError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def tokens_for(shared: int, shared_len: int, own: int, own_len: int) -> list[int]:
    """Tokens of a request: a prefix shared by every request of group `shared`, then its own."""
    return [shared * 10_000 + i for i in range(shared_len)] + [
        1_000_000 + own * 10_000 + i for i in range(own_len)
    ]
