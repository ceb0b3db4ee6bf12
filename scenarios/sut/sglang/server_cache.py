"""Build the cache the release's own server builds with `--enable-hierarchical-cache`.

Not a version table: where the release has `sglang/srt/mem_cache/registry.py` (its server's
tree-cache factory), the cache is what `default_radix_cache_factory` returns for a plain MHA
model (not hybrid SWA/SSM, not DSA) with hierarchical caching on: `UnifiedRadixCache` with
`init_hicache` on 0.5.19+. Before the registry existed the scheduler built the cache inline;
there a plain model with hierarchical caching took `HiRadixCache(params, server_args)`.

The driver (driver.py) needs certain methods and attributes of the cache ("seams") to pace and
observe it. A class without one of them is not driven: the run is `unknown` (exit 125) naming
the class and the missing seams (MissingSeam), never a verdict on the release.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from scenarios.core.errors import CannotJudge, MissingSeam
from scenarios.sut.sglang import tree_view

#: what the driver wraps or reads on the cache, every release (driver.py, hitqueue.py)
SEAMS = ("writing_check", "loading_check", "drain_storage_control_queues",
         "_drain_storage_control_queues_impl", "can_terminate_prefetch",
         "check_prefetch_progress", "_insert_helper_host", "write_backup",
         "prefetch_from_storage", "release_aborted_request", "init_load_back",
         "ready_to_load_host_cache", "evict_host", "ongoing_write_through", "ongoing_load_back",
         "ongoing_prefetch", "cache_controller", "root_node")
#: the tree view (tree_view.py): a walk from `root_node`, or the tree core's KV cache events
TREE_SEAM = "root_node"
#: what the hit-queue pipeline (0.5.16+) wraps in addition
HIT_QUEUE_SEAMS = ("_revoke_pending_prefetch",)
#: where the controller agrees on every prefetch batch (0.5.19+: `prefetch_sync_queue`), the
#: scheduler inserts the final ack's count here; 0.5.16 .. 0.5.18 have no such method
PER_BATCH_ACK_SEAMS = ("_handle_prefetch_result",)
#: the timeout stop policy's clock
TIMEOUT_SEAMS = ("is_prefetch_timeout",)
#: a seam's name in UnifiedRadixCache where it differs (read from the 0.5.20 / 0.5.23 wheels)
UNIFIED_NAMES: dict[str, str | tuple[str, ...]] = {"can_terminate_prefetch": "_can_terminate_prefetch",
                 "write_backup": "_execute_kv_backup",
                 "_revoke_pending_prefetch": "revoke_pending_prefetch",
                 # 0.5.19 .. 0.5.20; 0.5.21+ decide the deadline in `_prefetch_deadline_expired`
                 "is_prefetch_timeout": ("_prefetch_timeout_check_linear_func",
                                         "_prefetch_deadline_expired"),
                 "_insert_helper_host": "tree_core.insert_host"}
#: `cache_class` value: whatever the release's server builds
SERVER = "server"


class _TpWorker:
    """The one thing the factory asks of the scheduler's TP worker: a place for the cache's
    layer-transfer counter (the model forward that waits on it does not run here)."""

    def register_hicache_layer_transfer_counter(self, counter: Any) -> None:
        self.layer_done_counter = counter


def _factory() -> Any:
    try:
        from sglang.srt.mem_cache import registry
    except ImportError:
        return None
    return getattr(registry, "default_radix_cache_factory", None)


def build(params: Any, server_args: Any, *, tp_group: Any, tp_rank: int, tp_size: int,
          cache_class: str = SERVER) -> Any:
    """The cache: what the server builds (`cache_class="server"`), or the release's own
    `HiRadixCache` when asked for it by name (the class 0.5.9 .. 0.5.18 servers build)."""
    if cache_class == "HiRadixCache" or (cache_class == SERVER and _factory() is None):
        try:
            from sglang.srt.mem_cache.hiradix_cache import HiRadixCache
        except ModuleNotFoundError as e:
            raise MissingSeam("this release has no HiRadixCache (sglang/srt/mem_cache/"
                              "hiradix_cache.py)") from e
        return HiRadixCache(params, server_args)
    if cache_class != SERVER:
        raise CannotJudge(f"cache class '{cache_class}' is not one cpcheck builds "
                          f"(use '{SERVER}' or 'HiRadixCache')")
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    kw = {"server_args": server_args, "params": tree_view.wants_events(params), "is_hybrid_swa": False,
          "is_hybrid_ssm": False, "is_dsa": False, "enable_hierarchical_cache": True,
          "disable_radix_cache": False,
          "effective_chunked_prefill_size": getattr(server_args, "chunked_prefill_size", None),
          "tp_worker": _TpWorker(), "model_config": None, "tp_size": tp_size,
          "tp_rank": tp_rank, "tp_group": tp_group, "full_tokens_per_layer": None}
    names = {f.name for f in dataclasses.fields(TreeCacheBuildContext)}
    return _factory()(TreeCacheBuildContext(**{k: v for k, v in kw.items() if k in names}))


def alias(cache: Any, name: str) -> str:
    """The name of seam `name` on this cache (UnifiedRadixCache renamed some)."""
    if _has_attr(cache, name) or not hasattr(cache, "tree_core"):
        return name
    names = UNIFIED_NAMES.get(name, name)
    if isinstance(names, str):
        return names
    return next((n for n in names if _has(cache, n)), names[-1])


def _has(cache: Any, dotted: str) -> bool:
    """Present and readable: 0.5.23's Rust tree core raises NotImplementedError from
    `root_node` ("not yet ported to the Rust tree core"), which is a missing seam too."""
    obj = cache
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except (AttributeError, NotImplementedError):
            return False
    return True


def _has_attr(obj: Any, name: str) -> bool:
    try:
        getattr(obj, name)
    except (AttributeError, NotImplementedError):
        return False
    return True


def missing_seams(cache: Any, *, hit_queue: bool, timeout_policy: bool) -> list[str]:
    per_batch = hasattr(getattr(cache, "cache_controller", None), "prefetch_sync_queue")
    need = (SEAMS + (HIT_QUEUE_SEAMS if hit_queue else ())
            + (PER_BATCH_ACK_SEAMS if hit_queue and per_batch else ())
            + (TIMEOUT_SEAMS if timeout_policy else ()))
    if hasattr(cache, "tree_core") and not hit_queue:  # the revoke-queue hooks: HiRadixCache
        return ["prefetch_hit_queue (UnifiedRadixCache with a revoke-queue controller)"]
    missing = [alias(cache, n) for n in need
               if n != TREE_SEAM and not _has(cache, alias(cache, n))]
    if tree_view.for_cache(cache) is None:
        missing.append(f"{TREE_SEAM} (or KV cache events from its tree core)")
    return missing


def check_seams(cache: Any, version: str, *, hit_queue: bool, timeout_policy: bool) -> None:
    """Raise MissingSeam naming the class and every seam it lacks."""
    missing = missing_seams(cache, hit_queue=hit_queue, timeout_policy=timeout_policy)
    if missing:
        raise MissingSeam(f"sglang {version} builds {type(cache).__name__}, which lacks the "
                          f"seam(s) cpcheck's driver needs: {', '.join(missing)}")
