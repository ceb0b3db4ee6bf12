"""Crash-safe output: atomic file writes and the soak's report, kept current as the soak goes.

A soak that is interrupted (Ctrl-C, SIGTERM) or killed must not lose what it found, so the
report is rewritten (write to a temporary file, then `os.replace`) after every chunk, the plots
every few seconds, and both once more at the end. A reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from scenarios.core.errors import UsageError
from scenarios.core.fault_event import FaultEvent

#: 1: the first versioned report (adds "schema", "status", "interrupted", "unknown_runs",
#: "coverage", "fault_events"); 2: adds "unconfirmed_divergences" (the soak hunts on past them);
#: 3: adds "complete", "phase", "run_dir", "not_saved", "fault_runs", "provenance" (git commit,
#: cpcheck version, command line); 4: one fault model, `FaultEvent`: "faults" counts fault
#: events (it counted hits), each event has "hits", "run", "gated"; "fault_runs" has
#: "gated_runs" (gated chunks meet faults) instead of "faultable_runs"; docs/soak-report.md
#: describes every field
SOAK_REPORT_SCHEMA = 4
PLOT_EVERY_S = 5.0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a report is for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)  # no fsync: os.replace is atomic against a killed process
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


def check_writable(out: Path, flag: str = "--out", *, create: bool = True) -> Path:
    """Prove a file can be written under `out` before any work starts (UsageError if not).

    With `create=False` nothing is made: the nearest existing folder must be writable.
    """
    out = Path(out)
    try:
        if not create:
            probe_dir = out
            while not probe_dir.exists() and probe_dir != probe_dir.parent:
                probe_dir = probe_dir.parent
            if not probe_dir.is_dir():
                raise NotADirectoryError(20, "Not a directory")
            if not os.access(probe_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
            return out
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cpcheck-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {out}: not writable ({e.strerror or type(e).__name__})") from None
    return out


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send what native code writes to fd 2 (Mooncake's glog) to `path`; Python's own
    stderr (progress, errors) keeps going to the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    old_stderr = sys.stderr
    try:
        on_fd2 = old_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # already captured (pytest's capsys)
        on_fd2 = False
    if on_fd2:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8",
                               errors="replace")
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        if on_fd2:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
                sys.stderr.close()
            sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)


def _finite(obj: Any) -> Any:
    """JSON has no NaN / inf: write them as null rather than as invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class SoakReport(BaseModel):
    """report.json of one soak, as a typed model (schema SOAK_REPORT_SCHEMA).

    Written from the soak's first second (`complete: false`, the `phase` reached) and finished
    on every way out; `SoakReport.load(path)` reads one back (fields a newer writer added are
    kept, not refused)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_: int = Field(SOAK_REPORT_SCHEMA, alias="schema")
    complete: bool = False
    phase: str = "start-up"
    provenance: dict[str, Any] = Field(default_factory=dict)
    run_dir: str | None = None
    sut: str = "reference"
    layout: str = ""
    variant: str = ""
    backend: str = ""
    mode: str = ""
    protocol: str | None = None
    dp_attention: bool | None = None
    seed: int | None = None
    minutes: float = 0.0
    runs: int = 0
    decisions: int = 0
    seconds: float = 0.0
    decisions_per_s: float = 0.0
    runs_per_s: float = 0.0
    faults: dict[str, int] = Field(default_factory=dict)
    fault_runs: dict[str, Any] = Field(default_factory=dict)
    faults_never_fired: list[str] = Field(default_factory=list)
    status: str = "unknown"
    verdict: dict[str, Any] = Field(default_factory=dict)
    seconds_to_divergence: float | None = None
    confirmed_by_replay: bool | None = None
    interrupted: bool = False
    unknown_runs: list[dict[str, Any]] = Field(default_factory=list)
    #: runs cut by a lost agent (a pool over hosts): counted in unknown_runs too
    lost_runs: int = 0
    unconfirmed_divergences: list[dict[str, Any]] = Field(default_factory=list)
    unknown_diagnoses: list[str] = Field(default_factory=list)
    fault_events: list[FaultEvent] = Field(default_factory=list)
    replay: str | None = None
    not_saved: list[str] = Field(default_factory=list)
    prefetch_outcomes: dict[str, int] = Field(default_factory=dict)
    coverage: dict[str, Any] = Field(default_factory=dict)
    timeline: list[dict[str, Any]] = Field(default_factory=list)
    #: host pool slots in use after each run (the merge redraws the host pool plot from it)
    host_used: list[int] = Field(default_factory=list)
    #: which shard of a nightly this soak was (`--shard I/N`), or None
    shard: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(_finite(self.model_dump(by_alias=True)), indent=1, default=str)

    @classmethod
    def load(cls, path: str | Path) -> SoakReport:
        """A report.json (or a run dir / `latest` holding one); ValueError if it is not one."""
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        data = json.loads(p.read_text())
        if not isinstance(data, dict) or "schema" not in data:
            raise ValueError(f"{p}: not a cpcheck soak report (no 'schema')")
        return cls.model_validate(upgrade_report(data))


def upgrade_report(data: dict[str, Any]) -> dict[str, Any]:
    """A report of schema < 4 in today's fault model: its `faults` counted hits (delayed IO
    units, failed calls), so they are recounted from its `fault_events` (one per window at its
    first hit), whose `hits` it did not record (None). The old counts stay as `fault_hits_v3`."""
    schema = data.get("schema")
    if not isinstance(schema, int) or schema >= 4:
        return data
    from scenarios.core.fault_event import count_events

    events = [{**e, "hits": None} for e in data.get("fault_events") or ()
              if isinstance(e, dict)]
    return {**data, "fault_events": events, "fault_hits_v3": data.get("faults") or {},
            "faults": count_events(events, data.get("faults") or {})}


class ReportWriter:
    """report.json and the plots under `out`, rewritten atomically as the soak goes."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / "report.json"
        # the first plots come PLOT_EVERY_S in (or at the end): a short soak spends its
        # budget on runs, not on drawing
        self._last_plot = time.monotonic()
        self.plotted = False

    @staticmethod
    def load_plotting() -> None:
        """Import matplotlib now: an import cut by Ctrl-C leaves a broken module."""
        _figure(1, 1)

    def write_report(self, report: SoakReport) -> None:
        """report.json, atomically (OSError is the caller's to keep: a full disk)."""
        atomic_write_text(self.path, report.to_json())

    def plots_due(self, plots: bool | None) -> bool:
        return bool(plots or (plots is None
                              and time.monotonic() - self._last_plot >= PLOT_EVERY_S))

    def write_plots(self, timeline: list[dict], outcomes: Counter, host_used: list[int],
                    extra_plots: dict[str, Callable[[Path], None]] | None = None,
                    host_capacity: list[int] | None = None) -> None:
        """Every plot; `extra_plots` maps a file name under `out` to what draws it."""
        self._last_plot = time.monotonic()
        write_plots(self.out, timeline, outcomes, host_used, host_capacity)
        for name, draw in (extra_plots or {}).items():
            draw(self.out / name)
        self.plotted = True


def new_figure(w: float, h: float) -> Any:
    """A figure without pyplot's global state (cheaper, and safe beside other threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _figure(w: float, h: float) -> tuple[Any, Any]:
    fig = new_figure(w, h)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)
    return fig, fig.add_subplot()


def save_figure(fig: Any, path: Path) -> None:
    """PNG bytes first, then an atomic replace: a reader never sees half a plot."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(Path(path), buf.getvalue())


_save = save_figure


def write_plots(out: Path, timeline: list[dict], outcomes: Counter, host_used: list[int],
                host_capacity: list[int] | None = None) -> None:
    """Decisions per second with fault markers, prefetch outcomes, host-pool occupancy."""
    fig, ax = _figure(7, 3.5)
    ax.set_title("decisions per second", fontsize=9)
    ts = [p["t"] for p in timeline]
    ax.plot(ts, [p["run_decisions_per_s"] for p in timeline], lw=1, label="per run")
    ax.plot(ts, [p["decisions_per_s"] for p in timeline], lw=1.5, label="cumulative")
    marks = [p["t"] for p in timeline if p["faults_in_run"]]
    if marks:  # one collection, not one artist per run: plotting stays fast on long soaks
        ax.vlines(marks, 0, 1, transform=ax.get_xaxis_transform(), color="red", alpha=0.25,
                  lw=0.8, label="faults injected")
    ax.set_xlabel("seconds")
    ax.set_ylabel("decisions / s")
    ax.legend(loc="best", fontsize=8)
    _save(fig, out / "decisions_per_s.png")

    fig, ax = _figure(5, 3.5)
    ax.set_title("prefetch outcomes", fontsize=9)
    names = sorted(outcomes) or ["none"]
    ax.bar(names, [outcomes.get(n, 0) for n in names])
    ax.set_ylabel("prefetch decisions (all ranks)")
    _save(fig, out / "prefetch_outcomes.png")

    fig, ax = _figure(7, 3.5)
    ax.set_title("host pool at the end of each run", fontsize=9)
    ax.plot(range(1, len(host_used) + 1), host_used, marker=".", lw=1, label="used")
    if host_capacity:
        ax.step(range(1, len(host_capacity) + 1), host_capacity, where="mid", lw=1,
                color="grey", ls="--", label="capacity")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("run")
    ax.set_ylabel("host slots used at end (max over ranks)")
    _save(fig, out / "host_pool.png")
