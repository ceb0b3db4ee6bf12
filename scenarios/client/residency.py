"""Which pages a radix tree holds on device and host, in one form for every SUT: differential
mode compares it after each evict op, so an eviction order that differs from SGLang's shows
as the pages each side kept (node splits may differ between trees; pages do not)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def page_residency(nodes: Iterable[tuple[Sequence[int], int, bool, bool]],
                   page_size: int) -> tuple[str, ...]:
    """`nodes`: (the token path from the root to the node's end, the node's own token count,
    on device, on host). One "HASH:DH" per full page a node holds (HASH names the page by
    every token up to its end; D / H or '-' for device / host), sorted."""
    out = []
    for path, own, device, host in nodes:
        if not (device or host):
            continue
        start = len(path) - own
        for end in range(page_size, len(path) + 1, page_size):
            if end <= start:
                continue
            digest = hashlib.sha256(repr(tuple(path[:end])).encode()).hexdigest()[:10]
            out.append(f"{digest}:{'D' if device else '-'}{'H' if host else '-'}")
    return tuple(sorted(out))
