"""What several benchmarks share, kept in one place so their figures stay comparable: the KV
geometry behind "a page part of N bytes", the versions a result was measured with, and the
"where the best round went" table of both prefetch benchmarks. Imports no torch at load (the
SGLang benchmark's parent process does without it)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

#: tokens per page, KV heads, head dim and bytes per fp16 value of every benchmark's KV shape
PAGE_SIZE, HEADS, HEAD_DIM, FP16_BYTES = 16, 8, 128, 2


def layers_for(part_bytes: int, page_size: int = PAGE_SIZE) -> int:
    """Layers whose one page part (K or V of one page, every layer) is `part_bytes` of fp16."""
    return part_bytes // (page_size * HEADS * HEAD_DIM * FP16_BYTES)


def versions(**extra: str) -> dict:
    """Python, torch, Mooncake (the non-CUDA build, else the CUDA one), CPUs and host."""
    import torch

    def ver(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"
    mc = ver("mooncake-transfer-engine-non-cuda")
    return {"python": platform.python_version(), "torch": torch.__version__, **extra,
            "mooncake": mc if mc != "-" else ver("mooncake-transfer-engine"),
            "cpus": os.cpu_count(), "host": platform.node()}


def print_breakdown(who: str, rows: list[dict], names: list[str]) -> None:
    print(f"\nwhere {who} best round went (ms)\n")
    print("| page part | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        ph = row["breakdown_ms"]
        print(f"| {row['part_kib']} KiB | " + " | ".join(f"{ph[n]:.2f}" for n in names) + " |")
