"""A run's verdict as a plain value: agree, diverge or unknown (Jepsen's three)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scenarios.core.contract import STATUS_EXIT, Status


class Finding(tuple):
    """One checker finding: `(invariant, message)` as it is printed and stored, plus the
    `rule` that produced it, so that code reading findings filters by rule, never by the words
    of the message."""

    rule: str

    def __new__(cls, invariant: str, message: str, rule: str = "") -> Finding:
        self = super().__new__(cls, (invariant, message))
        self.rule = rule or invariant
        return self

    @property
    def invariant(self) -> str:
        return self[0]

    @property
    def message(self) -> str:
        return self[1]


@dataclass
class Verdict:
    """agree / diverge, or `unknown` (as Jepsen has) when infrastructure broke the run;
    `ok` stays `status == "agree"`."""

    ok: bool
    invariant: str | None = None
    message: str = "all ranks agree"
    failures: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    status: Status | None = None  # None: from `ok`
    diagnosis: str | None = None  # why it is `unknown` (what broke)

    def __post_init__(self) -> None:
        if self.status is None:
            self.status = "agree" if self.ok else "diverge"
        self.ok = self.status == "agree"

    @classmethod
    def unknown(cls, diagnosis: str, **kw: Any) -> Verdict:
        return cls(False, kw.pop("invariant", None), diagnosis, status="unknown",
                   diagnosis=diagnosis, **kw)

    @property
    def exit_code(self) -> int:
        return int(STATUS_EXIT[self.status or "unknown"])

    def summary(self) -> str:
        if self.status == "unknown":
            return f"UNKNOWN: {self.diagnosis}"
        if self.ok:
            return f"AGREE: {self.message}"
        return f"DIVERGE [{self.invariant}]: {self.message}"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "status": self.status, "invariant": self.invariant,
                "message": self.message, "diagnosis": self.diagnosis,
                "failures": self.failures, "stats": self.stats}
