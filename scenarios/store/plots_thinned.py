"""Soak plots thinned to what a figure can show: a merged report's, and every soak's faults.

Sixteen one-hour shards hold ~300,000 runs and ~300,000 fault events; drawing each as its own
mark took most of a merge's time and changes no pixel. Series are cut into at most `BINS` time
buckets first (the mean rate, the last cumulative value, the highest pool use, every bucket that
had a fault), and fault events are kept once per kind and bucket. Counts in labels come from the
unthinned data. report.json keeps everything.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

#: buckets per plot: a 7-inch figure at 90 dpi is ~630 pixels wide
BINS = 2000


def thin_timeline(timeline: list[dict], bins: int = BINS) -> list[dict]:
    """At most `bins` points: per time bucket the mean per-run rate, the last cumulative rate,
    and the sum of faults (a bucket with any fault keeps its mark)."""
    if len(timeline) <= bins:
        return timeline
    t_max = max(p["t"] for p in timeline) or 1.0
    buckets: dict[int, list[dict]] = {}
    for p in timeline:
        buckets.setdefault(min(int(p["t"] / t_max * bins), bins - 1), []).append(p)
    out = []
    for _, pts in sorted(buckets.items()):
        last = pts[-1]
        out.append({"t": last["t"], "runs": last["runs"], "decisions": last["decisions"],
                    "decisions_per_s": last["decisions_per_s"],
                    "run_decisions_per_s": sum(p["run_decisions_per_s"] for p in pts) / len(pts),
                    "faults_in_run": sum(p["faults_in_run"] for p in pts)})
    return out


def plot_host_pool(path: Path, host_used: list[int], bins: int = BINS) -> None:
    """Host slots used at the end of each run (max over ranks), the highest per run bucket."""
    from scenarios.store.report import new_figure, save_figure

    step = max(1, -(-len(host_used) // bins))
    xs = list(range(1, len(host_used) + 1, step))
    ys = [max(host_used[i - 1:i - 1 + step]) for i in xs]
    fig = new_figure(7, 3.5)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.95)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="." if step == 1 else None, lw=1)
    ax.set_xlabel("run (all shards)" if step == 1 else f"run (all shards; max of {step})")
    ax.set_ylabel("host slots used at end (max over ranks)")
    save_figure(fig, path)


def plot_faults(path: Path, events: list, seconds: float, kinds: tuple[str, ...],
                counts: dict[str, int] | None = None, bins: int = BINS,
                merged: bool = False) -> None:
    """One row per fault kind (`kinds`: the nemesis's), a mark per time bucket in which it
    fired (faults.png of a soak, or of a merged report). Labels count every event (or
    `counts`, the report's totals, where events were capped)."""
    from scenarios.core.fault_event import FaultEvent
    from scenarios.store.report import new_figure, save_figure

    evs = [e if isinstance(e, FaultEvent) else FaultEvent.model_validate(e) for e in events]
    width = max(seconds, 1.0) / bins
    seen: dict[str, set[int]] = {k: set() for k in kinds}
    fired = Counter(e.kind for e in evs)
    for kind, marks in seen.items():
        marks.update(int(e.t / width) for e in evs if e.kind == kind)
    fig = new_figure(7, 2.8)
    ax = fig.add_subplot()
    for row, kind in enumerate(kinds):
        ts = [b * width for b in sorted(seen[kind])]
        n = int((counts or {}).get(kind, fired[kind]))
        ax.scatter(ts, [row] * len(ts), s=14 if kind != "kill_rank" else 40,
                   marker="|" if kind != "kill_rank" else "x", label=f"{kind} ({n})")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlim(0, max(seconds, 1.0))
    ax.set_xlabel("seconds into each shard's soak" if merged else "seconds into the soak")
    ax.set_title("faults injected (all shards)" if merged else "faults injected", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
