"""The device KV pool a rank's cache is built on: SGLang's MHA pool, or its MLA pool.

The cache builds its host pool from the device pool's class (`MHATokenToKVPoolHost` for
`MHATokenToKVPool`, `MLATokenToKVPoolHost` for `MLATokenToKVPool`), and the controller's storage
config marks MLA from the same class (`is_mla_model`), which decides the key naming (no TP rank)
and that only storage TP rank 0 backs pages up. So choosing the device pool is all an MLA run
needs; the KV a "forward" writes is a pure function of the page's tokens, sharded by head for
MHA (each TP rank holds its heads) and replicated for MLA (every TP rank holds the same latent).
"""

from __future__ import annotations

from typing import Any

import torch

from scenarios.sut.sglang import adapters, shim

#: MHA: heads per rank x head dim; MLA: kv_lora_rank + qk_rope_head_dim (one latent per token)
HEADS, HEAD_DIM, LAYERS = 2, 4, 2
KV_LORA_RANK, QK_ROPE_HEAD_DIM = 6, 2
#: where a release defines its MLA host pool (0.5.20+ a module of its own, imported by the cache
#: only when an MLA pool is built; before, the module every host pool shares)
MLA_HOST_MODULES = ("sglang.srt.mem_cache.pool_host.mla", "sglang.srt.mem_cache.memory_pool_host")


def _load_mla_host_pool() -> None:
    """Import the MLA host pool's module before the cache does and apply the shim to it (no
    pinned memory, the CPU copies bound): the worker's shim ran before it was imported, and an
    unbound copy (0.5.23's `transfer_kv_direct`) would fail in SGLang's code, not ours."""
    import importlib

    for name in MLA_HOST_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:  # this release lacks it (or its package)
            if not e.name or not (name == e.name or name.startswith(e.name + ".")):
                raise
    shim.patch_loaded()


def build_device_pool(mla: bool, size: int, page_size: int) -> Any:
    """`MLATokenToKVPool` when the Schedule's model is MLA, `MHATokenToKVPool` otherwise."""
    from sglang.srt.mem_cache import memory_pool as mp

    if mla:
        _load_mla_host_pool()
        return adapters.call_filtered(mp.MLATokenToKVPool, size=size, page_size=page_size,
                                      dtype=torch.float32, kv_lora_rank=KV_LORA_RANK,
                                      qk_rope_head_dim=QK_ROPE_HEAD_DIM, layer_num=LAYERS,
                                      device="cpu", enable_memory_saver=False)
    return adapters.call_filtered(mp.MHATokenToKVPool, size=size, page_size=page_size,
                                  dtype=torch.float32, head_num=HEADS, head_dim=HEAD_DIM,
                                  layer_num=LAYERS, device="cpu", enable_memory_saver=False)


def is_mla(pool: Any) -> bool:
    return hasattr(pool, "kv_buffer") and not hasattr(pool, "k_buffer")


def page_values(pool: Any, page_size: int, base: int) -> torch.Tensor:
    """One page's KV for one layer, from an integer `base` (the page's content id)."""
    if is_mla(pool):
        n = page_size * (KV_LORA_RANK + QK_ROPE_HEAD_DIM)
        return (torch.arange(n, dtype=torch.float32) + base).reshape(page_size, 1, -1)
    n = page_size * HEADS * HEAD_DIM
    return (torch.arange(n, dtype=torch.float32) + base).reshape(page_size, HEADS, HEAD_DIM)


def write_page(pool: Any, idx: torch.Tensor, kv: torch.Tensor) -> None:
    """What a forward writes into slots `idx`, every layer (layer-dependent, so a page read
    back into the wrong layer is seen)."""
    if is_mla(pool):
        for layer, buf in enumerate(pool.kv_buffer):
            buf[idx] = kv + layer
        return
    for layer in range(len(pool.k_buffer)):
        pool.k_buffer[layer][idx] = kv + layer
        pool.v_buffer[layer][idx] = -kv - layer


def page_intact(pool: Any, idx: torch.Tensor, kv: torch.Tensor) -> bool:
    """Slots `idx` hold exactly what `write_page` wrote there."""
    if is_mla(pool):
        return all(torch.equal(buf[idx], kv + layer) for layer, buf in enumerate(pool.kv_buffer))
    return all(torch.equal(pool.k_buffer[layer][idx], kv + layer)
               and torch.equal(pool.v_buffer[layer][idx], -kv - layer)
               for layer in range(len(pool.k_buffer)))


def key_tail(storage_config: Any) -> tuple[str, tuple[str, ...]]:
    """(what follows the hash before the part, the parts) in Mooncake's naming
    (`mooncake_store`'s `mha_suffix` / `mla_suffix`): MHA `_{tp}` (+ `_{pp}` with PP > 1) and
    parts k, v; MLA `_` (or `_{pp}`) and part k alone."""
    pp = getattr(storage_config, "pp_size", 1) > 1
    pp_rank = getattr(storage_config, "pp_rank", 0)
    if getattr(storage_config, "is_mla_model", False):
        return (f"_{pp_rank}" if pp else "_"), ("k",)
    tail = f"_{storage_config.tp_rank}" + (f"_{pp_rank}" if pp else "")
    return tail, ("k", "v")
