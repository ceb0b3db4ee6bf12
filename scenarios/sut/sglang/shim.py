"""Let SGLang's HiCache import and run on CPU torch: the four GPU-only pieces, replaced.

Facts in docs/design/driving-sglang.md. Call `install()` before the first `import sglang` and
`patch_loaded()` after the mem_cache modules are imported and before any pool is built.
  1. torchvision: imported at module top level and must look installed to transformers; the
     PyPI wheel is a CUDA build. A meta_path stub (with metadata) whose members raise if used.
  2. sgl_kernel.kvcacheio: host pools import the transfer kernels at top level. Plain-torch
     index copies for the `direct` io backend (the only one that runs on CPU).
  3. pinned host memory: pools default to pin_memory=True (cudaHostRegister); forced False.
  4. triton: 1 GB real wheel; a permissive stub (decorators pass through, `.driver` raises).
  5. the host-memory reserve: a host pool refuses to build unless 10 GiB of RAM would stay
     free after it (HICACHE_HOST_MEMORY_RESERVE_BYTES; `ten_gb` before 0.5.11), sized for a
     serving host's OS. The harness's pools are kilobytes, and two xdist workers on the 24 GiB
     CI box leave less than 10 GiB free at times (0.5.11 refused once, at -0.76 GB). While a
     pool is built its `psutil.virtual_memory()` counts the reserve as available: a pool that
     does not fit in the RAM really free is still refused.
The stubs are only served when the real package is absent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import sys
import types
from typing import Any

import torch

# -- 2. plain-torch kvcacheio ----------------------------------------------------------------


def transfer_kv_direct(src_layers: list, dst_layers: list, src_indices: torch.Tensor,
                       dst_indices: torch.Tensor, page_size: int = 1, **_: Any) -> None:
    """Token-index copy per layer buffer: dst[dst_idx] = src[src_idx] (layer_first)."""
    s, d = src_indices.long().cpu(), dst_indices.long().cpu()
    for src, dst in zip(src_layers, dst_layers, strict=True):
        dst[d] = src[s].to(dst.device)


def _pages(idx: torch.Tensor, page_size: int) -> torch.Tensor:
    return idx.long().cpu()[::page_size] // page_size


def transfer_kv_per_layer_direct_pf_lf(src_ptrs: list, dst_ptrs: list, src_indices: torch.Tensor,
                                       dst_indices: torch.Tensor, layer_id: int, page_size: int,
                                       **_: Any) -> None:
    """Host page_first_direct [page, layer, page_size, ...] -> device layer buffer [token, ...]."""
    sp, d = _pages(src_indices, page_size), dst_indices.long().cpu()
    for src, dst in zip(src_ptrs, dst_ptrs, strict=True):
        dst[d] = src[sp, layer_id].reshape(-1, *dst.shape[1:]).to(dst.device)


def transfer_kv_all_layer_direct_lf_pf(src_ptrs: list, dst_ptrs: list, src_indices: torch.Tensor,
                                       dst_indices: torch.Tensor, page_size: int,
                                       **_: Any) -> None:
    """Device layer buffers (k layers then v layers) -> host page_first_direct buffers."""
    s, dp = src_indices.long().cpu(), _pages(dst_indices, page_size)
    layers = len(src_ptrs) // len(dst_ptrs)
    for j, dst in enumerate(dst_ptrs):
        for layer in range(layers):
            src = src_ptrs[j * layers + layer]
            dst[dp, layer] = src[s].reshape(len(dp), page_size, *src.shape[1:]).to(dst.device)


KVCACHEIO = {f.__name__: f for f in (transfer_kv_direct, transfer_kv_per_layer_direct_pf_lf,
                                     transfer_kv_all_layer_direct_lf_pf)}

# -- stub modules served from a meta_path finder ---------------------------------------------


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str) -> Any:  # InterpolationMode.NEAREST_EXACT and the like
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)


class _Placeholder(metaclass=_PlaceholderMeta):
    """Anything of a stubbed GPU package: fine to name, import or subclass, raises if called."""

    def __init__(self, *a: Any, **k: Any) -> None:
        raise RuntimeError(f"{type(self).__name__} is a CPU stub (cpcheck shim)")


def _placeholder(name: str) -> type:
    return type(name, (_Placeholder,), {})


class _DummyMeta(type):
    def __getattr__(cls, name: str) -> Any:  # tl.math.exp2 and the like
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Dummy,), {})


class _Dummy(metaclass=_DummyMeta):
    """A triton name that module-level code constructs (autotune configs): accepts anything."""

    def __init__(self, *a: Any, **k: Any) -> None:
        self.args, self.kwargs = a, k


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    """`@jit`, `@jit(...)`, `@autotune(...)`: return the function unchanged."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        root = self.__name__.split(".")[0]
        if root == "triton" and name == "driver":
            raise RuntimeError("triton.driver is not available on CPU (cpcheck shim)")
        if root == "triton" and name in ("jit", "autotune", "heuristics"):
            return _passthrough
        if root == "triton":  # Config(...), tl.constexpr, tl.int32: built at import, never run
            val: Any = type(name, (_Dummy,), {})
        else:
            val = _placeholder(name)
        setattr(self, name, val)
        return val


class _Dist(importlib.metadata.Distribution):
    def __init__(self, name: str, version: str) -> None:
        self._meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"

    def read_text(self, filename: str) -> str | None:
        return self._meta if filename in ("METADATA", "PKG-INFO") else None

    def locate_file(self, path: Any) -> Any:
        return path


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: dict[str, str]) -> None:
        self.roots = roots  # package -> version it reports

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        mod = _StubModule(spec.name)
        mod.__path__ = []
        root = spec.name.split(".")[0]
        mod.__version__ = self.roots[root]
        if spec.name == "sgl_kernel.kvcacheio":
            mod.__dict__.update(KVCACHEIO)
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        pass

    def find_distributions(self, context: Any = None) -> list:
        name = getattr(context, "name", None)
        if name is None:
            return [_Dist(n, v) for n, v in self.roots.items()]
        norm = name.replace("-", "_").lower()
        return [_Dist(n, v) for n, v in self.roots.items() if n == norm]


_STUBS = {"torchvision": "0.28.0+cpcheckstub", "sgl_kernel": "0.0.0+cpcheckstub",
          "triton": "3.5.0+cpcheckstub"}


def install() -> None:
    """Serve stubs for the GPU-only packages that are not really installed. Idempotent."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return
    missing = {n: v for n, v in _STUBS.items() if importlib.util.find_spec(n) is None}
    if missing:
        sys.meta_path.append(_StubFinder(missing))


# -- 3. pin_memory=False, and kvcacheio bound where 0.5.20 leaves the names undefined ---------


#: what SGLang keeps free before it builds a host pool (5. above)
SGLANG_HOST_RESERVE_BYTES = 10 * 1024**3


@contextlib.contextmanager
def reserve_lent() -> Any:
    """`psutil.virtual_memory()` with SGLang's reserve added back to `available`."""
    import psutil

    real = psutil.virtual_memory
    if getattr(real, "_cpcheck_lent", False):  # a subclass pool's __init__ calls its base's
        yield
        return

    def lent() -> Any:
        vm = real()
        return vm._replace(available=vm.available + SGLANG_HOST_RESERVE_BYTES)

    lent._cpcheck_lent = True  # type: ignore[attr-defined]
    psutil.virtual_memory = lent
    try:
        yield
    finally:
        psutil.virtual_memory = real


def _no_pin(init: Any) -> Any:
    """A host pool's __init__ without pinned memory (3.) and with the reserve lent (5.)."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if "pin_memory" in bound.arguments:
            bound.arguments["pin_memory"] = False
        with reserve_lent():
            init(*bound.args, **bound.kwargs)

    wrapper._cpcheck_no_pin = True  # type: ignore[attr-defined]
    return wrapper


def patch_loaded() -> None:
    """After importing sglang's mem_cache modules: no pinned memory and the reserve lent
    while a host pool is built, CPU copies bound."""
    for name, mod in list(sys.modules.items()):
        if not name.startswith("sglang.srt.mem_cache") or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            host_pool = isinstance(val, type) and (attr == "HostKVCache" or attr.endswith(
                ("KVCacheHost", "PoolHost")))
            if host_pool and "__init__" in vars(val) and \
                    not getattr(vars(val)["__init__"], "_cpcheck_no_pin", False):
                val.__init__ = _no_pin(vars(val)["__init__"])
        src = getattr(mod, "__file__", "") or ""
        if src.endswith(".py"):
            for fname, fn in KVCACHEIO.items():
                if fname not in vars(mod) and _mentions(src, fname):
                    setattr(mod, fname, fn)


@functools.cache
def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _mentions(path: str, name: str) -> bool:
    return name in _text(path)
