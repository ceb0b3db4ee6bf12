"""Per-release differences in SGLang's HiCache API, absorbed in one place.

The differences are listed in docs/design/driving-sglang.md.

- CacheInitParams gained fields over time (attn_cp/attn_tp groups in 0.5.11, pp_cache_group
  in 0.5.13): pass only the fields the release's dataclass has.
- 0.5.20 reads config from a process-global runtime_context: publish a real ServerArgs there
  (0.5.15.post1 has the module without `publish`: call it only where it exists).
- 0.5.16 reads "is DP attention on" from the runtime flags, not from the dp_attention module.
- 0.5.20 takes a handle with `.rid` where earlier releases take a request-id string.
- match_prefix / insert / evict / init_load_back take *Params objects where the release
  defines them, plain arguments otherwise.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace
from typing import Any


def call_filtered(fn: Any, **kwargs: Any) -> Any:
    """Call with only the keyword arguments `fn`'s signature accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def cache_init_params(**kwargs: Any) -> Any:
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    names = {f.name for f in dataclasses.fields(CacheInitParams)}
    return CacheInitParams(**{k: v for k, v in kwargs.items() if k in names})


def server_args(model_dir: str, *, dp_attention: bool, tp: int, cp: int = 1, pp_size: int = 1,
                rank: int | None = None, **hicache: Any) -> Any:
    from sglang.srt.server_args import ServerArgs

    kw = {"model_path": model_dir, "skip_tokenizer_init": True, "device": "cpu",
          "enable_hierarchical_cache": True, "tp_size": tp, "attn_cp_size": cp,
          "pp_size": pp_size, **hicache}
    # a dataclass up to 0.5.19, a plain class with a keyword constructor in 0.5.20
    args = call_filtered(ServerArgs, **kw)
    try:
        import sglang.srt.server_args as sa

        if hasattr(sa, "set_global_server_args_for_scheduler"):
            sa.set_global_server_args_for_scheduler(args)
    except Exception:
        pass
    try:
        from sglang.srt import runtime_context

        if hasattr(runtime_context, "publish"):
            # 0.5.21+: with this process's place in the topology (the parallel namespace)
            ranks = (call_filtered(runtime_context.SpawnRanks, world_rank=rank)
                     if rank is not None and hasattr(runtime_context, "SpawnRanks") else None)
            call_filtered(runtime_context.publish, args=args, server_args=args, role="scheduler",
                          ranks=ranks)
    except ImportError:
        pass
    return args


def publish_topology(model_dir: str, *, rank: int, tp: int, cp: int, pp: int = 1,
                     dp_attention: bool) -> None:
    """0.5.21+ read the parallel widths from the published `parallel` config namespace (not
    from `initialize_model_parallel`'s arguments): publish them, with this process's place,
    before the parallel state is built. Earlier releases take them as arguments."""
    import sglang.srt.distributed.parallel_state as ps

    if "tensor_model_parallel_size" in inspect.signature(ps.initialize_model_parallel).parameters:
        return
    server_args(model_dir, dp_attention=dp_attention, tp=tp, cp=cp, pp_size=pp, rank=rank)


def set_dp_attention(enabled: bool) -> None:
    """Where SGLang reads whether DP attention is on: a module flag up to 0.5.15.post1, the
    process-global runtime flags (`get_flags().dp.enabled`, set by `initialize_dp_attention`)
    from 0.5.16 on. It decides the storage config's tp rank, i.e. the keys CP peers write."""
    import sglang.srt.layers.dp_attention as dpa

    dpa._ENABLE_DP_ATTENTION_FLAG = bool(enabled)
    try:
        from sglang.srt.runtime_context import get_flags
    except ImportError:
        return
    flags = get_flags()
    if hasattr(getattr(flags, "dp", None), "enabled"):
        flags.dp.enabled = bool(enabled)


def storage_prefetch_retry_max_attempts(args: Any) -> int:
    """0.5.20 reads it from the published memory namespace; a ServerArgs field before."""
    v = getattr(args, "hicache_storage_prefetch_retry_max_attempts", None)
    if v is None:
        try:
            from sglang.srt.runtime_context import get_memory

            v = get_memory().hicache_storage_prefetch_retry_max_attempts
        except (ImportError, AttributeError, ValueError):
            v = 0
    return int(v)


def _params(cls_name: str, **kwargs: Any) -> Any:
    from sglang.srt.mem_cache import base_prefix_cache as b

    cls = getattr(b, cls_name)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def _takes_params(fn: Any) -> bool:
    ps = list(inspect.signature(fn).parameters)
    return bool(ps) and ps[0] == "params"


def radix_key(tokens: list[int]) -> Any:
    """The release's RadixKey (its token ids as `token_seq` gives them)."""
    try:
        from sglang.srt.mem_cache.radix_cache import RadixKey
    except ImportError:
        return list(tokens)
    return RadixKey(token_ids=token_seq(tokens))


def token_seq(tokens: list[int]) -> Any:
    """Token ids as the release's scheduler holds them: a list, or (0.5.21+, where RadixKey
    takes `token_ids: array[int]` and the Rust tree core asserts it) an int64 `array('q')`."""
    try:
        from sglang.srt.mem_cache.radix_cache import RadixKey
    except ImportError:
        return list(tokens)
    if "array" in str(inspect.signature(RadixKey).parameters["token_ids"].annotation):
        from array import array

        return array("q", tokens)
    return list(tokens)


def token_ids(key: Any) -> list[int]:
    return list(getattr(key, "token_ids", key))


def match(cache: Any, tokens: list[int]) -> Any:
    key = radix_key(tokens)
    if _takes_params(cache.match_prefix):
        return cache.match_prefix(_params("MatchPrefixParams", key=key))
    return cache.match_prefix(key)


def device_prefix_len(m: Any) -> int:
    """A match's device-resident prefix length (0.5.22+ `device_prefix_len`, no indices)."""
    return m.device_prefix_len if hasattr(m, "device_prefix_len") else len(m.device_indices)


def device_indices(cache: Any, m: Any) -> Any:
    """A match's device KV indices: its `device_indices`, or (0.5.22+, where the match carries
    only a length) read off the path to its device node, as `prefix_device_indices` does."""
    if hasattr(m, "device_indices"):
        return m.device_indices
    return cache.path_device_indices(m.last_device_node)[:m.device_prefix_len]


def insert(cache: Any, tokens: list[int], value: Any, prefix_len: int = 0) -> int:
    """UnifiedRadixCache frees the request's slots of tokens the tree already holds past
    `prev_prefix_len` itself (the scheduler passes the request's matched prefix); earlier
    caches leave that to the caller (`frees_duplicates`)."""
    key = radix_key(tokens)
    if _takes_params(cache.insert):
        extra = {"prev_prefix_len": prefix_len} if is_unified(cache) else {}
        out = cache.insert(_params("InsertParams", key=key, value=value, **extra))
    else:
        out = cache.insert(key, value)
    return int(getattr(out, "prefix_len", out))


def frees_duplicates(cache: Any) -> bool:
    return is_unified(cache)


def evict(cache: Any, n: int) -> None:
    if _takes_params(cache.evict):
        cache.evict(_params("EvictParams", num_tokens=n))
    else:
        cache.evict(n)


class RequestStandIn(SimpleNamespace):
    """What UnifiedRadixCache reads of a scheduler `Req` (a plain MHA request, no SWA, no
    Mamba state). Ours: a field a release reads that this lacks is the harness's fault
    (blame.py), not SGLang's."""


def is_unified(cache: Any) -> bool:
    """UnifiedRadixCache (what 0.5.19+ servers build): a tree core addressed by node ids."""
    return hasattr(cache, "tree_core")


def init_load_back(cache: Any, m: Any, host_hit_length: int, rid: str = "") -> Any:
    """`m` is the match result: 0.5.13 loads back from its `best_match_node`.
    UnifiedRadixCache reads the request: its id and the device node its match ended on."""
    last_host_node = m.last_host_node
    if _takes_params(cache.init_load_back):
        req = (RequestStandIn(rid=rid, last_node=m.last_device_node, swa_host_hit_length=0,
                              mamba_host_hit_length=0, kv=RequestStandIn(mamba_pool_idx=None))
               if is_unified(cache) else None)
        return cache.init_load_back(_params(
            "InitLoadBackParams", last_host_node=last_host_node,
            best_match_node=getattr(m, "best_match_node", last_host_node),
            host_hit_length=host_hit_length, req=req))
    return call_filtered(cache.init_load_back, last_node=last_host_node,
                         host_hit_length=host_hit_length, prefix_len=host_hit_length)


def lock(cache: Any, node: Any) -> Any:
    """The receipt UnifiedRadixCache's `dec_lock_ref` wants back (None before it)."""
    out = cache.inc_lock_ref(node)
    return out.to_dec_params() if hasattr(out, "to_dec_params") else None


def unlock(cache: Any, node: Any, receipt: Any) -> None:
    if receipt is None:
        cache.dec_lock_ref(node)
    else:
        cache.dec_lock_ref(node, receipt)


def on_device(node: Any) -> bool:
    """A tree node's full KV is on the device (UnifiedTreeNode: not `evicted`)."""
    return node.value is not None if hasattr(node, "value") else not node.evicted


def on_host(node: Any) -> bool:
    return node.host_value is not None if hasattr(node, "host_value") else node.backuped


def last_hash(node: Any, cache: Any = None) -> str | None:
    if isinstance(node, int) and cache is not None:  # UnifiedRadixCache: a node id
        return cache.get_last_hash_value(node)
    fn = getattr(node, "get_last_hash_value", None)
    if fn is not None:
        return fn()
    hv = getattr(node, "hash_value", None)
    return hv[-1] if hv else None


def _rid_arg(fn: Any, rid: str) -> Any:
    """0.5.20 takes a handle with `.rid` (parameter named `handle`, `request` in
    UnifiedRadixCache, which keys its ongoing prefetches by the handle: one equal object per
    request); earlier a string."""
    ps = list(inspect.signature(fn).parameters)
    if not ps or ps[0] not in ("handle", "request"):
        return rid
    try:
        from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
    except ImportError:
        return SimpleNamespace(rid=rid)
    return call_filtered(CacheRequestHandle, rid=rid, attempt_id=0)


def prefetch_from_storage(cache: Any, rid: str, last_host_node: Any, tokens: list[int],
                          last_hash_value: str | None) -> None:
    fn = cache.prefetch_from_storage
    call_filtered(fn, **{list(inspect.signature(fn).parameters)[0]: _rid_arg(fn, rid)},
                  last_host_node=last_host_node, last_host_node_id=last_host_node,
                  new_input_tokens=token_seq(tokens),
                  last_hash=last_hash_value)


def prefetching(cache: Any, rid: str) -> bool:
    """Whether the request has a prefetch in flight (UnifiedRadixCache keys by the handle)."""
    return rid in cache.ongoing_prefetch or (
        _rid_arg(cache.check_prefetch_progress, rid) in cache.ongoing_prefetch)


def check_prefetch_progress(cache: Any, rid: str) -> bool:
    fn = cache.check_prefetch_progress
    return bool(fn(_rid_arg(fn, rid)))


def release_aborted_request(cache: Any, rid: str) -> None:
    fn = cache.release_aborted_request
    fn(_rid_arg(fn, rid))
