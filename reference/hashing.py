"""Chained page hashes and storage keys.

A page's hash covers the previous page's hash and this page's token ids, so one key names a
whole prefix and is identical on every rank, in every process and every run (no `hash()`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass


def page_hash(token_ids: Sequence[int], prior_hash: str | None = None) -> str:
    """SHA-256 over the prior page's hash and this page's token ids (little-endian int64)."""
    hasher = hashlib.sha256()
    if prior_hash is not None:
        hasher.update(bytes.fromhex(prior_hash))
    # the same bytes as one update per token (int(t).to_bytes(8, "little", signed=True)),
    # packed at once: 34 instead of 68 us per 32 pages of 16 tokens, on the prefetch path
    fmt = f"<{len(token_ids)}q"
    try:
        packed = struct.pack(fmt, *token_ids)
    except struct.error:  # int-likes without __index__ (what int() accepts)
        packed = struct.pack(fmt, *map(int, token_ids))
    hasher.update(packed)
    return hasher.hexdigest()


def page_hashes(
    token_ids: Sequence[int], page_size: int, prior_hash: str | None = None
) -> list[str]:
    """Hashes of every full page of `token_ids`; a trailing partial page gets none."""
    hashes: list[str] = []
    h = prior_hash
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        h = page_hash(token_ids[start : start + page_size], h)
        hashes.append(h)
    return hashes


def storage_tp_rank(tp_rank: int, tp_size: int, cp_rank: int, dp_attention: bool) -> int:
    """The TP rank in MHA keys (SGLang's _generate_storage_config): the attention-TP rank with
    DP attention, else the global TP rank, so CP peers then write different keys."""
    return tp_rank if dp_attention else cp_rank * tp_size + tp_rank


@dataclass(frozen=True)
class KeySuffix:
    """What a rank appends to a page hash, following SGLang's mooncake_store naming.

    MHA-style pools shard heads over TP, so each TP rank stores its own copy
    (`{hash}_{tp_rank}_k`); MLA-style pools are replicated, so the key has no TP rank
    (`{hash}__k`) and only TP rank 0 backs up. PP rank joins when PP > 1. The CP rank never
    appears: CP peers hold the same page and must share its key (PR #20460).
    """

    tp_rank: int
    pp_rank: int = 0
    pp_size: int = 1
    is_mla: bool = False
    prefix: str = ""
    #: set only by the known-bad variant `cp_rank_in_key` (the bug before PR #20460)
    cp_rank: int | None = None

    def key(self, page_hash_hex: str, part: str) -> str:
        return f"{self.prefix}{page_hash_hex}{self.tail(part)}"

    def keys(self, hashes: Sequence[str], parts: Sequence[str]) -> list[str]:
        """`key(h, p)` for every hash, then every part: the flat order storage calls take."""
        tails = [self.tail(p) for p in parts]
        pre = self.prefix
        return [f"{pre}{h}{t}" for h in hashes for t in tails]

    def tail(self, part: str) -> str:
        """What follows the hash in `part`'s key (built once per part: the prefetch path builds
        a key per page part per batch)."""
        cache = self.__dict__.setdefault("_tails", {})
        t = cache.get(part)
        if t is None:
            t = cache[part] = self._tail(part)
        return t

    def _tail(self, part: str) -> str:
        parts = [""]
        if self.is_mla:
            parts.append(str(self.pp_rank) if self.pp_size > 1 else "")
        else:
            parts.append(str(self.tp_rank))
            if self.pp_size > 1:
                parts.append(str(self.pp_rank))
        if self.cp_rank is not None:
            parts.append(f"cp{self.cp_rank}")
        parts.append(part)
        return "_".join(parts)
