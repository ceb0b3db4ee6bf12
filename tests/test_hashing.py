"""Page hashes and storage keys: what makes CP peers (and later runs) find the same L3 pages.

A key must name a whole prefix (chained hashes), be identical in every process (no salted
`hash()`), and follow SGLang's naming so that peers that hold the same page share its key; only
the known-bad variant `cp_rank_in_key` may put the CP rank in it (the bug before PR #20460).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.hashing import (
    KeySuffix,
    backend_tag_prefix,
    namespace_seed,
    page_hash,
    page_hashes,
    storage_tp_rank,
)

REPO = Path(__file__).resolve().parents[1]
PS = 4
# at least 100 / 150; a larger Hypothesis profile (e.g. nightly) raises it
EXAMPLES = max(100, settings.default.max_examples)
MORE_EXAMPLES = max(150, settings.default.max_examples)

UINT32 = st.integers(0, 2**32 - 1)
tokens_st = st.lists(UINT32, min_size=0, max_size=40)


@settings(max_examples=MORE_EXAMPLES, deadline=None)
@given(tokens=tokens_st, cut=st.integers(0, 40))
def test_prefix_property(tokens: list[int], cut: int) -> None:
    """Hashes of a prefix are a prefix of the hashes: a key names the prefix up to its page."""
    full = page_hashes(tokens, PS)
    assert full[: cut // PS] == page_hashes(tokens[: cut // PS * PS], PS)
    assert page_hashes(tokens[:cut], PS) == full[: min(cut, len(tokens)) // PS]


@settings(max_examples=MORE_EXAMPLES, deadline=None)
@given(tokens=tokens_st, extra=st.lists(st.integers(0, 9), max_size=PS - 1))
def test_partial_trailing_page_ignored(tokens: list[int], extra: list[int]) -> None:
    aligned = tokens[: len(tokens) // PS * PS]
    hashes = page_hashes(aligned + extra, PS)
    assert len(hashes) == len(aligned) // PS
    assert hashes == page_hashes(aligned, PS)


@settings(max_examples=MORE_EXAMPLES, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**31), min_size=2 * PS, max_size=40),
    data=st.data(),
)
def test_chained_earlier_page_changes_every_later_hash(tokens: list[int], data) -> None:  # noqa: ANN001
    tokens = tokens[: len(tokens) // PS * PS]
    pos = data.draw(st.integers(0, len(tokens) - 1))
    changed = list(tokens)
    changed[pos] += 1
    a, b = page_hashes(tokens, PS), page_hashes(changed, PS)
    page = pos // PS
    assert a[:page] == b[:page]
    # every page from the changed one on differs, though later pages have the same tokens
    assert all(x != y for x, y in zip(a[page:], b[page:], strict=True))


def test_chain_uses_prior_hash() -> None:
    tokens = list(range(3 * PS))
    full = page_hashes(tokens, PS)
    assert page_hashes(tokens[PS:], PS, prior_hash=full[0]) == full[1:]
    assert page_hashes(tokens[PS:], PS) != full[1:]  # same tokens, different prefix
    assert full[0] == page_hash(tokens[:PS])
    assert re.fullmatch(r"[0-9a-f]{64}", full[0])


_CHILD = (
    "import json, sys; from reference.hashing import page_hashes; "
    "print(json.dumps(page_hashes(json.loads(sys.argv[1]), int(sys.argv[2]))))"
)


def test_identical_across_processes() -> None:
    """Two fresh interpreters (different hash seeds) compute the same hashes as this one."""
    tokens = [7, 3, 2**32 - 1, 0, 5, 5, 5, 5, 1, 2, 3, 4, 9]
    outs = []
    for seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(tokens), str(PS)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1] == page_hashes(tokens, PS)
    assert len(outs[0]) == 3


# -- keys --------------------------------------------------------------------------------------

H = "ab" * 32


@pytest.mark.parametrize(
    ("suffix", "part", "want"),
    [
        (KeySuffix(tp_rank=0), "k", f"{H}_0_k"),
        (KeySuffix(tp_rank=3), "v", f"{H}_3_v"),
        (KeySuffix(tp_rank=1, pp_rank=2, pp_size=4), "k", f"{H}_1_2_k"),
        (KeySuffix(tp_rank=1, pp_rank=0, pp_size=2), "v", f"{H}_1_0_v"),
        (KeySuffix(tp_rank=1, pp_rank=0, pp_size=1), "v", f"{H}_1_v"),
        # pp_rank defaults to the first stage (mutation testing found this default unpinned)
        (KeySuffix(tp_rank=1, pp_size=2), "k", f"{H}_1_0_k"),
        (KeySuffix(tp_rank=0, pp_size=3, is_mla=True), "k", f"{H}_0_k"),
        (KeySuffix(tp_rank=0, is_mla=True), "k", f"{H}__k"),
        (KeySuffix(tp_rank=5, is_mla=True), "k", f"{H}__k"),
        (KeySuffix(tp_rank=1, pp_rank=1, pp_size=2, is_mla=True), "k", f"{H}_1_k"),
        (KeySuffix(tp_rank=0, prefix="run7/"), "k", f"run7/{H}_0_k"),
    ],
)
def test_key_follows_sglang_naming(suffix: KeySuffix, part: str, want: str) -> None:
    assert suffix.key(H, part) == want


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    tp=st.integers(0, 7), pp=st.integers(0, 3), pp_size=st.integers(1, 4),
    mla=st.booleans(), cp=st.integers(0, 7),
)
def test_cp_rank_only_in_key_when_set(tp: int, pp: int, pp_size: int, mla: bool, cp: int) -> None:
    """The fixed key never depends on the CP rank; the cp_rank_in_key variant's does."""
    pp = min(pp, pp_size - 1)
    base = KeySuffix(tp_rank=tp, pp_rank=pp, pp_size=pp_size, is_mla=mla)
    key = base.key(H, "k")
    assert "cp" not in key.removeprefix(H)
    bad0 = KeySuffix(tp_rank=tp, pp_rank=pp, pp_size=pp_size, is_mla=mla, cp_rank=0)
    bad1 = KeySuffix(tp_rank=tp, pp_rank=pp, pp_size=pp_size, is_mla=mla, cp_rank=1)
    assert bad0.key(H, "k") != bad1.key(H, "k")
    assert bad0.key(H, "k") != key and bad1.key(H, "k") != key
    assert f"cp{cp}" in KeySuffix(tp_rank=tp, cp_rank=cp).key(H, "v")


def test_mha_tp_ranks_have_distinct_keys_mla_share() -> None:
    """MHA shards heads over TP (a key per TP rank); MLA is replicated (one key)."""
    assert KeySuffix(tp_rank=0).key(H, "k") != KeySuffix(tp_rank=1).key(H, "k")
    assert KeySuffix(tp_rank=0, is_mla=True).key(H, "k") == KeySuffix(
        tp_rank=1, is_mla=True
    ).key(H, "k")


def _per_token_page_hash(token_ids: list, prior_hash: str | None) -> str:
    """The definition, SGLang's `get_hash_str`: one SHA-256 update per token, 4 bytes unsigned
    little-endian (what page_hash packs into one)."""
    import hashlib

    hasher = hashlib.sha256()
    if prior_hash is not None:
        hasher.update(bytes.fromhex(prior_hash))
    for t in token_ids:
        hasher.update(int(t).to_bytes(4, "little", signed=False))
    return hasher.hexdigest()


@settings(max_examples=EXAMPLES, deadline=None)
@given(tokens=st.lists(UINT32, max_size=40),
       prior=st.none() | st.binary(min_size=32, max_size=32).map(bytes.hex))
def test_packed_hash_is_the_per_token_definition(tokens: list[int], prior: str | None) -> None:
    """Packing the tokens at once gives the per-token digest, hence SGLang's keys."""
    assert page_hash(tokens, prior) == _per_token_page_hash(tokens, prior)
    # int-likes hash as the ints they are: bools, and floats (int() of them, as before)
    assert page_hash([bool(t % 2) for t in tokens], prior) == _per_token_page_hash(
        [t % 2 for t in tokens], prior)
    small = [t % 1000 for t in tokens]
    assert page_hash([float(t) for t in small], prior) == _per_token_page_hash(small, prior)


@settings(max_examples=EXAMPLES, deadline=None)
@given(hashes=st.lists(st.text("0123456789abcdef", min_size=1, max_size=8), max_size=6),
       tp=st.integers(0, 7), pp=st.integers(0, 3), pp_size=st.sampled_from([1, 4]),
       mla=st.booleans(), prefix=st.sampled_from(["", "run7_"]),
       cp=st.none() | st.integers(0, 3))
def test_keys_are_key_of_every_hash_and_part(hashes: list[str], tp: int, pp: int, pp_size: int,
                                             mla: bool, prefix: str, cp: int | None) -> None:
    s = KeySuffix(tp_rank=tp, pp_rank=pp, pp_size=pp_size, is_mla=mla, prefix=prefix, cp_rank=cp)
    parts = ("k",) if mla else ("k", "v")
    assert s.keys(hashes, parts) == [s.key(h, p) for h in hashes for p in parts]
    fresh = KeySuffix(tp_rank=tp, pp_rank=pp, pp_size=pp_size, is_mla=mla, prefix=prefix,
                      cp_rank=cp)
    assert fresh == s and hash(fresh) == hash(s)  # the tail cache is no field


#: SGLang's own digests (`get_hash_str` of sglang 0.5.11, computed once): pinned here so that
#: the default suite, without any release environment, still fails if the bytes hashed change
SGLANG_1234 = "cf97adeedb59e05bfd73a2b4c2a8885708c4f4f70c84c64b27120e72ab733b72"
SGLANG_NEXT = "7ef05fce7cd1197332d9d5e4708ced3ed29dd09db04b8f96a177dacf0567eacf"


def test_digests_are_sglangs() -> None:
    """Token ids hash as SGLang hashes them (4-byte unsigned), not as 8-byte signed ints."""
    assert page_hash([1, 2, 3, 4]) == SGLANG_1234
    assert page_hash([0, 2**32 - 1, 5, 6], SGLANG_1234) == SGLANG_NEXT
    assert page_hashes([1, 2, 3, 4, 0, 2**32 - 1, 5, 6], PS) == [SGLANG_1234, SGLANG_NEXT]
    assert page_hash([1, 2, 3, 4], "") == SGLANG_1234  # an empty prior is none (`if prior_hash:`)


@pytest.mark.parametrize("bad", [-1, 2**32, 2**40])
def test_token_ids_sglang_cannot_hash_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match=f"token id {bad} is not a uint32"):
        page_hash([1, bad, 3])


@pytest.mark.parametrize(
    ("tag", "model", "want"),
    [(None, None, ""), ("run7", None, "run7_"), ("run7", "org/llama-3", "run7_org-llama-3_"),
     (None, "m", "m_"), ("", None, "_")],
)
def test_backend_tag_prefix_is_mooncakes(tag: str | None, model: str | None, want: str) -> None:
    """0.5.11 `_tag_keys`: `{tag}_{key}`; 0.5.20 `config_prefix`: tag and model joined by '_'."""
    assert backend_tag_prefix(tag, model) == want


def test_namespace_seed_keeps_unnamespaced_keys_and_tells_parts_apart() -> None:
    assert namespace_seed(None, None) is None
    seeds = [namespace_seed(*p) for p in [("", None), (None, ""), ("a", None), (None, "a"),
                                          ("ab", ""), ("a", "b"), ("", "ab")]]
    assert len(set(seeds)) == len(seeds)
    assert all(re.fullmatch(r"[0-9a-f]{64}", x) for x in seeds)
    # a seeded chain names other keys than the unseeded one for the same tokens
    assert page_hashes(list(range(8)), PS, namespace_seed("a", None)) != page_hashes(
        list(range(8)), PS)


def test_int_likes_in_the_uint32_range_hash_as_their_ints() -> None:
    """Values int() accepts but struct does not (floats) take the slow path, checked against
    the same uint32 limit: up to 2**32 - 1 they hash as their ints (mutation testing found the
    limit unpinned below 2**32)."""
    ints = [7, 2**31 + 5, 2**32 - 1]
    assert page_hash([float(t) for t in ints]) == page_hash(ints)


@pytest.mark.parametrize("tp_size, cp_size", [(1, 2), (2, 2), (4, 2), (2, 3)])
def test_storage_tp_rank_is_attention_tp_with_dp_attention_else_the_global_tp_rank(
        tp_size: int, cp_size: int) -> None:
    """With DP attention the key carries the attention-TP rank (CP peers share keys); without,
    the rank within the stage's TP group as the ranks are laid out (CP peers differ)."""
    from scenarios.core.layout import Layout

    layout = Layout(tp_size, cp_size)
    for cp in range(cp_size):
        for tp in range(tp_size):
            assert storage_tp_rank(tp, tp_size, cp, dp_attention=True) == tp
            assert storage_tp_rank(tp, tp_size, cp, dp_attention=False) == layout.rank_of(tp, cp)


@pytest.mark.parametrize("extra_key, cache_salt, seed", [
    ("tenant-a", None, "52487530505be6b1e015cf6a16652cde4a0adf38a8cd6f16b3d6c3998fca01ad"),
    (None, "salt", "43601f36bb365a5bdb202f3b4398e5edcdc529750311c8aa2028ce19293f8d6e"),
    ("a", "bc", "b8080ec8e713ddb4b5469eaf5874a021a72286a24e6c55d2046f0acfb48a938b"),
    ("", "", "bea08aaebe976c9c4f8ebade6674ba3fe15783c47020e10c4721ad211aae36e4"),
    ("ü", None, "f69e2d81fe86e1c3eb67ce7ab2c047a23cc0c83431953a7fc4cfbc464d6e5237"),
])
def test_namespace_seed_is_sglang_0_5_20s_byte_for_byte(extra_key: str | None,
                                                         cache_salt: str | None,
                                                         seed: str) -> None:
    """Known answers of SGLang 0.5.20's `storage_namespace_seed` (computed once with the
    release's function): the seed is every first page's prior hash, so one byte off (a length
    field of 9 bytes, say) moves every namespaced key."""
    assert namespace_seed(extra_key, cache_salt) == seed
