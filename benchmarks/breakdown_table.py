"""The "where the best round went" table both prefetch benchmarks print (one page-part size a
row, one phase a column, milliseconds), kept in one place so the two stay comparable."""

from __future__ import annotations


def print_breakdown(who: str, rows: list[dict], names: list[str]) -> None:
    print(f"\nwhere {who} best round went (ms)\n")
    print("| page part | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        ph = row["breakdown_ms"]
        print(f"| {row['part_kib']} KiB | " + " | ".join(f"{ph[n]:.2f}" for n in names) + " |")
