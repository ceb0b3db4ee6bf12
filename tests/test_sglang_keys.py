"""The reference's storage keys are SGLang's, byte for byte: for random token lists, page sizes,
priors and store configurations, each built release's own `get_hash_str` (native from 0.5.20),
`storage_namespace_seed` and `MooncakeStore` key naming (tag / config prefix, `{hash}_{tp}_k|v`,
`{hash}_{tp}_{pp}_k`, `{hash}__k`, `{hash}_{pp}_k`) against `reference.hashing`.

The reference used to hash token ids as 8-byte signed integers: every key differed from the key
SGLang writes for the same tokens (tests/test_hashing.py pins the digests without any release).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reference.api import KeySuffix, backend_tag_prefix, namespace_seed, page_hashes
from scenarios.sut.sglang import envs
from tests.sglang_envs import need

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("sglang_hashing_child.py")
#: 0.5.23 (the newest; its native hash as 0.5.20's) costs 1-3 min of import on a loaded
#: 2-core box, and 0.5.11 hashes and names keys as 0.5.10.post1 does (the same `get_hash_str`,
#: moved to mem_cache/utils.py): the nightly checks both, the default suite the other two
RELEASES = ("0.5.10.post1", pytest.param("0.5.11", marks=pytest.mark.soak), "0.5.20",
            pytest.param("0.5.23", marks=pytest.mark.soak))
SEEDS = range(5)
NAMESPACES = [("a", None), (None, "a"), ("", None), (None, ""), ("ab", ""), ("a", "b"),
              ("", "ab"), ("tenant/é", "salt")]


def _chains(rng: random.Random) -> list[tuple[list[int], int, str | None]]:
    out = []
    for _ in range(8):
        ps = rng.choice([1, 2, 4, 16, 64])
        n = rng.randint(0, 4 * ps + ps - 1)  # whole pages and a trailing partial one
        tokens = [rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**32),
                              rng.randrange(200_000)]) for _ in range(n)]
        prior = rng.choice([None, None, rng.randbytes(32).hex()])
        out.append((tokens, ps, prior))
    return out


def _configs(rng: random.Random, hashes: list[str]) -> list[dict]:
    out = []
    for _ in range(6):
        pp_size = rng.choice([1, 1, 2, 4])
        out.append({"tp": rng.randrange(8), "pp": rng.randrange(pp_size), "pp_size": pp_size,
                    "mla": rng.random() < 0.4, "tag": rng.choice([None, "run7", "r-1_x"]),
                    "model": rng.choice([None, "m", "org/llama-3"]),
                    "hashes": rng.sample(hashes, min(len(hashes), rng.randint(1, 4)))})
    return out


def _release_run(version: str, request: dict) -> dict:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": envs.torch_extensions_dir(version),
           "PYTHONPATH": os.pathsep.join([str(REPO), envs.pythonpath(version)])}
    p = subprocess.run([sys.executable, str(CHILD)], input=json.dumps(request), text=True,
                       capture_output=True, env=env, cwd=REPO, timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, f"sglang {version} child failed:\n{p.stderr[-3000:]}"
    return json.loads(line.removeprefix("RESULT "))


def _reference_key(cfg: dict, version: str) -> list[str]:
    # 0.5.20 folds the model name into its config prefix; 0.5.11 and before tag only
    model = cfg["model"] if envs.parse_release(version) >= (0, 5, 20, 0) else None
    suffix = KeySuffix(tp_rank=cfg["tp"], pp_rank=cfg["pp"], pp_size=cfg["pp_size"],
                       is_mla=cfg["mla"], prefix=backend_tag_prefix(cfg["tag"], model))
    return suffix.keys(cfg["hashes"], ("k",) if cfg["mla"] else ("k", "v"))


@pytest.mark.sglang
@pytest.mark.parametrize("version", RELEASES)
def test_reference_keys_are_the_releases(version: str) -> None:
    need(version)
    chains, configs = [], []
    for seed in SEEDS:  # several seeds, one child per release (its import takes seconds)
        rng = random.Random(seed)
        c = _chains(rng)
        chains += c
        hashes = [h for tokens, ps, prior in c for h in page_hashes(tokens, ps, prior)]
        configs += _configs(rng, hashes or ["0" * 64])
    got = _release_run(version, {"chains": chains, "seeds": NAMESPACES, "keys": configs})
    want = [page_hashes(tokens, ps, prior) for tokens, ps, prior in chains]
    assert sum(map(len, want)) >= 50
    for case, theirs, ours in zip(chains, got["chains"], want, strict=True):
        assert ours == theirs, f"page hashes differ for {case}"
    if got["seeds"] is not None:  # 0.5.20+: namespace seeds, and chains seeded by them
        assert got["seeds"] == [namespace_seed(a, b) for a, b in NAMESPACES]
    for cfg, theirs in zip(configs, got["keys"], strict=True):
        assert _reference_key(cfg, version) == theirs, f"keys differ for {cfg}"
