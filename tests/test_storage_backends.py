"""The in-process backends (memory, file) honour the HiCacheStorage contract byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.storage.base import HiCacheStorage, as_bytes
from reference.storage.file import FileStorage, key_to_filename
from reference.storage.memory import MemoryStorage, clear_namespace, namespace_keys
from tests.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[1]

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float8_e4m3fn,
]


def random_page(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes viewed as `dtype`: every bit pattern (NaNs included) must survive."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def keys_for(n: int) -> list[str]:
    """Keys shaped like SGLang's MHA keys: {hash}_{tp_rank}_k."""
    return [f"{uuid.uuid4().hex}_{i % 2}_{'kv'[i % 2]}" for i in range(n)]


@pytest.fixture
def memory_factory() -> Iterator[Callable[[], HiCacheStorage]]:
    ns = f"test-{uuid.uuid4().hex}"
    yield lambda: MemoryStorage(ns)
    clear_namespace(ns)


@pytest.fixture
def file_factory(tmp_path: Path) -> Callable[[], HiCacheStorage]:
    return lambda: FileStorage(tmp_path / "store")


@pytest.fixture(params=["memory", "file"])
def factory(
    request: pytest.FixtureRequest,
    memory_factory: Callable[[], HiCacheStorage],
    file_factory: Callable[[], HiCacheStorage],
) -> Callable[[], HiCacheStorage]:
    """Makes clients of one fresh store of each backend kind."""
    return memory_factory if request.param == "memory" else file_factory


# ---------------------------------------------------------------- round trip (hypothesis)

page_shapes = st.tuples(
    st.sampled_from([1, 2, 4]),  # layers
    st.sampled_from([1, 16, 64]),  # page size (tokens)
    st.integers(1, 4),  # heads
    st.sampled_from([8, 64, 128]),  # head dim
)


@pytest.mark.parametrize("kind", ["memory", "file"])
@settings(deadline=None)  # example count comes from the profile (conftest)
@given(
    shapes=st.lists(page_shapes, min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_byte_identical(
    kind: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ns = f"rt-{uuid.uuid4().hex}"
        store: HiCacheStorage = MemoryStorage(ns) if kind == "memory" else FileStorage(tmp)
        try:
            keys = keys_for(len(shapes))
            values = [random_page(s, dtype, seed + i) for i, s in enumerate(shapes)]
            originals = [v.clone() for v in values]
            assert store.batch_set(keys, values) == [True] * len(keys)
            for v in values:  # the caller reuses its host slots: the store must hold copies
                as_bytes(v).fill_(0xA5)
            targets = [torch.empty_like(v) for v in values]
            assert store.batch_get(keys, targets) == [True] * len(keys)
            for got, want in zip(targets, originals, strict=True):
                assert same_bytes(got, want)
            assert store.batch_exists(keys) == len(keys)
        finally:
            store.close()
            clear_namespace(ns)


# ---------------------------------------------------------------- contract, both backends


def test_write_once_keeps_first_value(factory: Callable[[], HiCacheStorage]) -> None:
    a, b = factory(), factory()  # two clients of one store, like two ranks
    key = keys_for(1)
    first, second = (
        random_page((2, 16, 2, 64), torch.bfloat16, 1),
        random_page((2, 16, 2, 64), torch.bfloat16, 2),
    )
    assert a.batch_set(key, [first]) == [True]
    assert b.batch_set(key, [second]) == [True]  # already present counts as success
    out = torch.empty_like(first)
    assert a.batch_get(key, [out]) == [True]
    assert same_bytes(out, first)
    assert not same_bytes(out, second)


def test_batch_exists_is_a_hit_prefix(factory: Callable[[], HiCacheStorage]) -> None:
    store = factory()
    keys = keys_for(5)
    page = random_page((1, 16, 1, 8), torch.float16, 3)
    assert store.batch_exists([]) == 0
    assert store.batch_exists(keys) == 0
    # keys 0, 1, 3, 4 present; the hole at 2 stops the prefix even though 3 and 4 exist
    store.batch_set([keys[i] for i in (0, 1, 3, 4)], [page] * 4)
    assert store.batch_exists(keys) == 2
    assert store.batch_exists(keys[3:]) == 2
    assert store.batch_exists(keys[2:]) == 0
    assert [store.exists(k) for k in keys] == [True, True, False, True, True]
    store.batch_set([keys[2]], [page])
    assert store.batch_exists(keys) == 5


def test_batch_get_reports_each_miss(factory: Callable[[], HiCacheStorage]) -> None:
    store = factory()
    keys = keys_for(3)
    pages = [random_page((1, 16, 2, 8), torch.float32, i) for i in range(3)]
    store.batch_set([keys[0], keys[2]], [pages[0], pages[2]])
    targets = [torch.zeros_like(p) for p in pages]
    assert store.batch_get(keys, targets) == [True, False, True]
    assert same_bytes(targets[0], pages[0]) and same_bytes(targets[2], pages[2])
    assert torch.count_nonzero(targets[1]) == 0  # a miss leaves the target untouched


def test_size_mismatch_is_a_miss(factory: Callable[[], HiCacheStorage]) -> None:
    store = factory()
    key = keys_for(1)
    page = random_page((1, 16, 2, 8), torch.float16, 4)  # 512 bytes
    store.batch_set(key, [page])
    for wrong in (torch.zeros(255, dtype=torch.float16), torch.zeros(257, dtype=torch.float16)):
        assert store.batch_get(key, [wrong]) == [False]
        assert torch.count_nonzero(wrong) == 0
    # the same bytes under another dtype and shape are fine: backends move raw bytes
    as_int = torch.empty(128, dtype=torch.int32)
    assert store.batch_get(key, [as_int]) == [True]
    assert torch.equal(as_bytes(as_int), as_bytes(page))


def test_closed_client_misses_and_never_raises(factory: Callable[[], HiCacheStorage]) -> None:
    live, closing = factory(), factory()
    key = keys_for(1)
    page = random_page((4, 4), torch.float32, 5)
    live.batch_set(key, [page])
    closing.close()
    closing.close()  # idempotent
    assert closing.batch_exists(key) == 0
    assert closing.batch_get(key, [torch.empty_like(page)]) == [False]
    assert closing.batch_set(keys_for(1), [page]) == [False]
    assert live.batch_exists(key) == 1  # the data outlives the closed client


def test_bad_arguments_raise(factory: Callable[[], HiCacheStorage]) -> None:
    store = factory()
    page = torch.zeros(4, 4)
    with pytest.raises(ValueError):
        store.batch_set(keys_for(2), [page])
    with pytest.raises(ValueError):
        store.batch_get(keys_for(1), [page, page])
    with pytest.raises(ValueError, match="contiguous"):
        store.batch_set(keys_for(1), [page.t()])
    assert store.batch_set([], []) == [] and store.batch_get([], []) == []


def test_concurrent_writers_of_one_key(factory: Callable[[], HiCacheStorage]) -> None:
    """Ranks race to back up the same page: all succeed and exactly one value is kept."""
    key = keys_for(1)
    pages = [random_page((1, 64, 4, 64), torch.bfloat16, 100 + i) for i in range(8)]
    results: list[list[bool]] = []
    barrier = threading.Barrier(len(pages))

    def write(p: torch.Tensor) -> None:
        store = factory()
        barrier.wait(timeout=10)
        results.append(store.batch_set(key, [p]))

    threads = [threading.Thread(target=write, args=(p,)) for p in pages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [[True]] * len(pages)
    out = torch.empty_like(pages[0])
    assert factory().batch_get(key, [out]) == [True]
    assert sum(same_bytes(out, p) for p in pages) == 1


# ---------------------------------------------------------------- memory backend


def test_memory_namespaces_shared_and_isolated() -> None:
    ns_a, ns_b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    try:
        rank0, rank1, other = MemoryStorage(ns_a), MemoryStorage(ns_a), MemoryStorage(ns_b)
        key = keys_for(1)
        page = random_page((1, 16, 1, 8), torch.float32, 6)
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(rank1.batch_set(key, [page]) == [True]))
        t.start()
        t.join(timeout=10)
        assert seen == [True]
        assert rank0.batch_exists(key) == 1  # same namespace, other thread: shared
        assert other.batch_exists(key) == 0  # other namespace: isolated
        assert namespace_keys(ns_a) == key and namespace_keys(ns_b) == []
        clear_namespace(ns_a)
        assert rank0.batch_exists(key) == 0 and rank1.batch_exists(key) == 0
        assert rank1.batch_set(key, [page]) == [True] and rank0.batch_exists(key) == 1
    finally:
        clear_namespace(ns_a)
        clear_namespace(ns_b)


def test_memory_get_returns_a_copy() -> None:
    ns = f"copy-{uuid.uuid4().hex}"
    try:
        store = MemoryStorage(ns)
        key = keys_for(1)
        page = random_page((8, 8), torch.float32, 7)
        store.batch_set(key, [page])
        out = torch.empty_like(page)
        store.batch_get(key, [out])
        out.fill_(0)  # scribbling on what we read must not change the store
        again = torch.empty_like(page)
        assert store.batch_get(key, [again]) == [True] and same_bytes(again, page)
    finally:
        clear_namespace(ns)


# ---------------------------------------------------------------- file backend


def test_file_survives_reopen(tmp_path: Path) -> None:
    keys = keys_for(4)
    pages = [random_page((2, 16, 2, 64), torch.float16, 10 + i) for i in range(4)]
    first = FileStorage(tmp_path)
    assert first.batch_set(keys, pages) == [True] * 4
    first.close()
    reopened = FileStorage(tmp_path)
    assert reopened.batch_exists(keys) == 4
    targets = [torch.empty_like(p) for p in pages]
    assert reopened.batch_get(keys, targets) == [True] * 4
    assert all(same_bytes(t, p) for t, p in zip(targets, pages, strict=True))


def test_file_size_mismatch_on_disk(tmp_path: Path) -> None:
    """A file whose size is not the target's (truncated, foreign) is a miss, not garbage."""
    store = FileStorage(tmp_path)
    key = keys_for(1)
    page = random_page((1, 16, 2, 8), torch.float32, 8)
    store.batch_set(key, [page])
    path = store.path_for(key[0])
    assert path.stat().st_size == page.nbytes
    with open(path, "r+b") as f:
        f.truncate(page.nbytes - 4)
    out = torch.zeros_like(page)
    assert store.batch_get(key, [out]) == [False]
    assert torch.count_nonzero(out) == 0


def test_file_writes_are_atomic_and_tidy(tmp_path: Path) -> None:
    store = FileStorage(tmp_path, fsync=True)
    keys = keys_for(3)
    store.batch_set(keys, [random_page((64, 64), torch.float32, i) for i in range(3)])
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(key_to_filename(k) for k in keys)  # no temp files left behind


def test_file_unwritable_dir_is_false_not_raise(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # the directory vanishes under the client
    page = random_page((4, 4), torch.float32, 9)
    assert store.batch_set(keys_for(1), [page]) == [False]


@pytest.mark.parametrize(
    "key",
    ["../escape", "a/b", ".", "..", ".hidden", "%41", "A", "sp ace", "ünï", "", "x" * 300],
)
def test_file_keys_are_sanitised(tmp_path: Path, key: str) -> None:
    root = tmp_path / "store"
    store = FileStorage(root)
    page = random_page((4, 4), torch.float32, 11)
    assert store.batch_set([key], [page]) == [True]
    files = list(tmp_path.rglob("*"))
    assert [p.parent for p in files if p.is_file()] == [root]  # nothing outside the root
    out = torch.empty_like(page)
    assert store.batch_get([key], [out]) == [True] and same_bytes(out, page)
    name = key_to_filename(key)
    assert "/" not in name and not name.startswith(".") and len(name) < 255


def test_file_key_mapping_is_injective() -> None:
    keys = ["a", "A", "%41", "a.b", "a%2Eb", "a_b", "a-b", "x" * 300, "x" * 301, "ü", "%C3%BC"]
    names = [key_to_filename(k) for k in keys]
    assert len(set(names)) == len(keys)


# ---------------------------------------------------------------- mooncake without mooncake


def test_reference_imports_without_mooncake() -> None:
    """`reference` must import, and MooncakeStorage fail with the install hint, sans mooncake."""
    code = (
        "import sys\n"
        "sys.modules['mooncake'] = None\n"
        "sys.modules['mooncake.store'] = None\n"
        "import reference.storage.mooncake as m\n"
        "try:\n"
        "    m.MooncakeStorage(m.MooncakeConfig('127.0.0.1:1'))\n"
        "except m.StorageError as e:\n"
        "    print('ERR', e)\n"
    )
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "ERR mooncake is not installed: pip install 'cpcheck[mooncake-cpu]'"
    )
