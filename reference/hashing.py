"""Chained page hashes and storage keys.

A page's hash covers the previous page's hash and this page's token ids, so one key names a
whole prefix and is identical on every rank, in every process and every run (no `hash()`).
The bytes are SGLang's (`srt/mem_cache/utils.py` `get_hash_str`, natively hashed from 0.5.20):
SHA-256 over the prior digest, then each token id as a 4-byte little-endian unsigned integer, so
the reference writes the keys SGLang writes for the same tokens.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

#: token ids are hashed as uint32 (SGLang refuses larger or negative ones, as this module does)
TOKEN_ID_LIMIT = 2**32


def page_hash(token_ids: Sequence[int], prior_hash: str | None = None) -> str:
    """SHA-256 over the prior page's digest and this page's token ids (little-endian uint32).

    An empty `prior_hash` is no prior, as in SGLang (`if prior_hash:`). A token id outside
    [0, 2**32) raises ValueError: SGLang cannot hash it either (OverflowError / out_of_range).
    """
    hasher = hashlib.sha256()
    if prior_hash:
        hasher.update(bytes.fromhex(prior_hash))
    # the same bytes as one update per token (int(t).to_bytes(4, "little", signed=False)),
    # packed at once: half the time per 32 pages of 16 tokens, on the prefetch path
    fmt = f"<{len(token_ids)}I"
    try:
        packed = struct.pack(fmt, *token_ids)
    except struct.error:  # int-likes without __index__ (what int() accepts), or out of range
        ints = [int(t) for t in token_ids]
        bad = next((t for t in ints if not 0 <= t < TOKEN_ID_LIMIT), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not a uint32 (SGLang hashes token ids as "
                             "4-byte unsigned integers)") from None
        packed = struct.pack(fmt, *ints)
    hasher.update(packed)
    return hasher.hexdigest()


def namespace_seed(extra_key: str | None, cache_salt: str | None) -> str | None:
    """The prior hash of a request's first page in 0.5.20+ (`storage_namespace_seed`): None
    without a namespace (keys as before), else a digest that tells absent, empty and joined
    parts apart, so requests of different namespaces never share a storage key."""
    if extra_key is None and cache_salt is None:
        return None
    digest = hashlib.sha256(b"sglang-cache-namespace-v1")
    for part in (extra_key, cache_salt):
        if part is None:
            digest.update(b"\x00")
            continue
        encoded = part.encode("utf-8")
        digest.update(b"\x01" + len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def backend_tag_prefix(extra_backend_tag: str | None, model_name: str | None = None) -> str:
    """What SGLang's MooncakeStore puts before the page hash: `{extra_backend_tag}_` in 0.5.11;
    in 0.5.20 a config prefix, the tag and the model name ('/' as '-') joined by '_', then '_'
    (pass no model name for the older releases)."""
    parts = [] if extra_backend_tag is None else [str(extra_backend_tag)]
    if model_name:
        parts.append("-".join(model_name.split("/")))
    return "_".join(parts) + "_" if parts else ""


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
