"""A stand-in for the forward pass: KV that is a pure function of the page and the rank.

Each page's K/V depends only on its chained hash and on this rank's head shard (TP rank for
MHA; none for MLA, which is replicated), so any rank, any run, can say what a page must hold.
CP peers compute identical KV for a page, which is why they may share its storage key.
"""

from __future__ import annotations

import torch

from reference.hashing import page_hashes
from reference.memory_pool import DeviceKVPool, KVShape


def page_kv(page_hash_hex: str, shape: KVShape, page_size: int, tp_rank: int) -> torch.Tensor:
    """parts x layers x page_size x heads x head_dim, deterministic in (hash, shard)."""
    shard = 0 if shape.is_mla else tp_rank
    g = torch.Generator().manual_seed((int(page_hash_hex[:15], 16) * 131 + shard) % (2**63))
    return torch.randn(
        len(shape.parts), shape.layers, page_size, shape.heads, shape.head_dim, generator=g
    ).to(shape.dtype)


def forward_fill(pool: DeviceKVPool, tokens: list[int], device_indices: torch.Tensor,
                 start_token: int, tp_rank: int) -> None:
    """Write KV for tokens[start_token:] (full pages only) into their device slots."""
    ps = pool.page_size
    hashes = page_hashes(tokens, ps)
    for p in range(start_token // ps, len(hashes)):
        kv = page_kv(hashes[p], pool.shape, ps, tp_rank)  # P x L x ps x H x D
        idx = device_indices[p * ps : (p + 1) * ps].to(pool.device)
        pool.buffer.index_copy_(2, idx, kv.permute(1, 0, 2, 3, 4).to(pool.device))


def verify_device_pages(pool: DeviceKVPool, tokens: list[int], device_indices: torch.Tensor,
                        tp_rank: int) -> list[int]:
    """Page numbers whose device KV differs from what the page must hold."""
    ps = pool.page_size
    bad = []
    for p, h in enumerate(page_hashes(tokens, ps)[: device_indices.numel() // ps]):
        want = page_kv(h, pool.shape, ps, tp_rank).permute(1, 0, 2, 3, 4)
        got = pool.buffer.index_select(2, device_indices[p * ps : (p + 1) * ps].to(pool.device))
        if not torch.equal(got.cpu(), want):
            bad.append(p)
    return bad
