"""One cell of the release matrix (release x DP attention x layout) as a typed value.

The cells file is the matrix's only memory (a run takes hours and may be cut), so its shape is a
model: a cell read from disk is validated once, here, and every reader after that (the table,
`--resume`, the merge, the docs) reads fields, never a dict key or a "k/n" string. On disk the
shape stays the documented JSON of format `cpcheck-sglang-matrix/1` ("k/n" replay counts
included), so committed cells files keep loading.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

#: verdicts of a finished cell; anything else ("running", "error") is redone by --resume
FINISHED = ("agree", "diverge", "flaky", "cannot")

CellVerdict = Literal["running", "agree", "diverge", "flaky", "cannot", "error"]


class Replays(BaseModel):
    """k of n replays reproduced a divergence; written "k/n" in the cells file."""

    model_config = ConfigDict(frozen=True)

    k: int = Field(ge=0)
    n: int = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            k, sep, n = v.partition("/")
            if not (sep and k.strip().isdigit() and n.strip().isdigit()):
                raise ValueError(f"replay count {v!r} is not 'k/n'")
            return {"k": int(k), "n": int(n)}
        return v

    @model_serializer
    def _as_text(self) -> str:
        return f"{self.k}/{self.n}"

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"

    @property
    def recurred(self) -> bool:
        return self.k > 0


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusFile(_Part):
    """One corpus Schedule run in a cell."""

    file: str
    #: "cannot": the release lacks a seam the file needs (e.g. no decode side): not judged,
    #: and not an error of the machine either
    verdict: Literal["agree", "diverge", "flaky", "error", "cannot"]
    invariant: str | None = None
    message: str | None = None
    reproduced: Replays | None = None
    first_seen: str | None = None
    replay: str | None = None
    error: str | None = None


class CorpusResult(_Part):
    """The corpus half of a cell: how many files ran and how each ended."""

    n: int = 0
    diverge: int = 0
    flaky: int = 0
    error: int = 0
    cannot: int = 0
    files: list[CorpusFile] = []

    @property
    def agreed(self) -> int:
        return self.n - self.flaky - self.error - self.cannot

    @property
    def divergent(self) -> list[CorpusFile]:
        return [f for f in self.files if f.verdict == "diverge"]


class GeneratedResult(_Part):
    """The generated half of a cell: the hunt's budget and, when it found something, what."""

    examples: int = 0
    seed: int | None = None
    budget: int | None = None
    infra_errors: list[str] = []
    infra_replays: list[str] = []
    first_s: float | None = None
    first_n: int | None = None
    shrink_s: float | None = None
    shrunk_ops: int | None = None
    reproduced: Replays | None = None
    invariant: str | None = None
    message: str | None = None
    first_seen: str | None = None
    shrunk_seen: str | None = None
    replay: str | None = None

    @property
    def found(self) -> bool:
        """A divergence was seen (confirmed or not) by the generated hunt."""
        return self.first_s is not None or self.reproduced is not None


class Cell(_Part):
    """A cell as `cpcheck matrix` writes it when it starts ("running") and when it finishes."""

    release: str
    dp_attention: bool | None = None
    layout: str | None = None
    verdict: CellVerdict
    #: the cache class the release's ranks built for this cell (what its server builds)
    cache_class: str | None = None
    why: str | None = None
    error: str | None = None
    legacy: bool = False
    corpus: CorpusResult | None = None
    generated: GeneratedResult | None = None
    seconds: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    loadavg_start: list[float] = []
    loadavg_end: list[float] = []
    command: str | None = None
    commit: str | None = None
    examples_budget: int | None = None
    shrink_budget_s: float | None = None
    host_cpus: int | None = None

    @property
    def key(self) -> str:
        return cell_key(self.release, self.dp_attention, self.layout)

    @property
    def finished(self) -> bool:
        return self.verdict in FINISHED

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def cell_key(release: str, dp_attention: bool | None, layout: str | None) -> str:
    dp = "-" if dp_attention is None else ("on" if dp_attention else "off")
    return f"{release}|{dp}|{layout or '-'}"
