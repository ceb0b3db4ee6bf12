"""Run inside one SGLang release's environment (by tests/test_sglang_keys.py): reads page
chains, namespace seeds and store configurations as JSON on stdin, and prints what the release's
own code makes of them: `get_hash_str` page by page (as the cache chains pages),
`storage_namespace_seed` where the release has it, and the keys SGLang's `MooncakeStore` asks
the Mooncake client for in `batch_exists` (built by its own constructor, with a client that
only answers its setup and warm-up)."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from scenarios.sut.sglang import shim

shim.install()

from sglang.srt.mem_cache import utils as sgl_utils  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.mooncake_store import mooncake_store  # noqa: E402

get_hash_str = getattr(sgl_utils, "get_hash_str", None)
if get_hash_str is None:  # 0.5.10.post1 and earlier
    from sglang.srt.mem_cache.hicache_storage import get_hash_str


class SetupOnlyClient:
    """Answers what the store's constructor asks (setup, warm-up put / exists / get)."""

    def __init__(self) -> None:
        self.held: dict[str, bytes] = {}

    def setup(self, *a: Any, **k: Any) -> int:
        return 0

    def put(self, key: str, value: bytes, *a: Any, **k: Any) -> int:
        self.held[key] = value
        return 0

    def is_exist(self, key: str) -> int:
        return int(key in self.held)

    def get(self, key: str, *a: Any, **k: Any) -> bytes:
        return self.held.get(key, b"")


mooncake_store.MooncakeStore._import_mooncake_store = lambda self: SetupOnlyClient


def queried_keys(cfg: dict, hashes: list[str]) -> list[str]:
    fields = {f.name for f in dataclasses.fields(HiCacheStorageConfig)}
    extra = {"master_server_address": "127.0.0.1:1", "check_server": False}
    if cfg["tag"] is not None:
        extra["extra_backend_tag"] = cfg["tag"]
    sc = {"tp_rank": cfg["tp"], "tp_size": 8, "pp_rank": cfg["pp"], "pp_size": cfg["pp_size"],
          "attn_cp_rank": 0, "attn_cp_size": 1, "is_mla_model": cfg["mla"],
          "enable_storage_metrics": False, "is_page_first_layout": True,
          "model_name": cfg["model"], "tp_lcm_size": None, "should_split_heads": False,
          "extra_config": extra}
    store = mooncake_store.MooncakeStore(
        HiCacheStorageConfig(**{k: v for k, v in sc.items() if k in fields}), None)
    seen: list[str] = []

    def exist(keys: list[str]) -> list[int]:
        seen.extend(keys)
        return [1] * len(keys)

    store._batch_exist = exist
    assert store.batch_exists(hashes) == len(hashes)
    return seen


def main() -> None:
    req = json.load(sys.stdin)
    out: dict[str, list] = {"chains": [], "seeds": [], "keys": []}
    for tokens, ps, prior in req["chains"]:
        h, hs = prior, []
        for i in range(0, len(tokens) - ps + 1, ps):
            h = get_hash_str(tokens[i:i + ps], h)
            hs.append(h)
        out["chains"].append(hs)
    seed = getattr(sgl_utils, "storage_namespace_seed", None)
    out["seeds"] = None if seed is None else [seed(a, b) for a, b in req["seeds"]]
    out["keys"] = [queried_keys(cfg, cfg["hashes"]) for cfg in req["keys"]]
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
