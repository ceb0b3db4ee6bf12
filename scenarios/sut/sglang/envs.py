"""Build and cache one CPU environment per SGLang release, sharing a common base.

Layout under ``build/sglang-envs/`` (gitignored):
  base/        the CPU dependency set every release imports (docs/design/driving-sglang.md), ``pip --target``
  base.json    what base holds, its build time and bytes
  <V>/         only ``sglang==V --no-deps``, its pinned transformers and what that pin needs
               beyond the system and base (tokenizers, huggingface_hub, ...), plus extras
  <V>.json     manifest: pins, build seconds, bytes added, the import check's result

A release runs with ``PYTHONPATH=<V>:base`` on top of the system interpreter, whose torch
(2.13.0 CPU) is reused: nothing here ever installs torch, triton, nvidia-* or any CUDA wheel,
and a resolution that would is refused before anything is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scenarios.core.config import REPO_ROOT, SGLANG_ENVS_DIR
from scenarios.core.errors import CannotJudge, EnvBuildError, UsageError

ROOT = SGLANG_ENVS_DIR
#: the oldest release this harness drives; there is no newest: a release newer than the
#: adapters know gets a run, and a seam it lacks is a 125 naming that seam (MissingSeam)
FIRST = (0, 5, 9)
FIX_RELEASE = "0.5.11"  # first release with PR #20460

#: the CPU set the HiCache import chain needs, transformers aside (docs/design/driving-sglang.md)
BASE = ["numpy", "orjson", "psutil", "pybase64", "requests", "packaging", "pillow", "starlette",
        "tqdm", "IPython", "pydantic", "aiohttp", "msgspec", "pyzmq", "openai==2.6.1",
        "partial_json_parser", "dill", "sentencepiece", "gguf", "einops"]
#: installed without dependencies (theirs pull torch / transformers / triton)
BASE_NO_DEPS = ["compressed-tensors", "loguru", "frozendict"]
#: a module an import needs -> what provides it, installed --no-deps into the release dir
EXTRAS = {"xgrammar": "xgrammar==0.2.1", "tvm_ffi": "apache-tvm-ffi==0.1.11"}
_FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|flashinfer.*|"
                        r"sgl-kernel|sglang-kernel|cuda-.*|cupy.*)$", re.I)


def parse_release(text: str) -> tuple[int, ...]:
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", text.strip())
    if not m:
        raise UsageError(f"'{text}' is not an sglang release number (e.g. 0.5.11, 0.5.10.post1)")
    return tuple(int(g) if g else 0 for g in m.groups())


def in_range(version: str) -> bool:
    return parse_release(version)[:3] >= FIRST


def check_runnable(version: str) -> None:
    """Exit-code contract: not a release number -> 2; older than 0.5.9 -> 125."""
    v = parse_release(version)
    if not _built(version) and not on_index(version):
        raise UsageError(f"sglang {version}: no such release on the package index")
    if v[:3] < FIRST:
        raise CannotJudge(f"sglang {version} is older than 0.5.9, the first release this "
                          f"harness drives: cannot run here")


def _built(version: str, root: Path | None = None) -> bool:
    m = load_manifest(version, root or ROOT)
    return m is not None and m.ok


def on_index(version: str) -> bool:
    """Whether the package index has this sglang release (one metadata-only query)."""
    try:
        resolve([f"sglang=={version}"], no_deps=True)
        return True
    except EnvBuildError:
        return False


def _pip(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _failed_package(out: str, fallback: str) -> str:
    for pat in (r"No matching distribution found for (\S+)",
                r"Could not find a version that satisfies the requirement (\S+)",
                r"Failed to build (\S+)", r"Building wheel for (\S+)"):
        m = re.search(pat, out)
        if m:
            return m.group(1)
    return fallback


def resolve(reqs: list[str], *, no_deps: bool = False, pythonpath: str = "") -> list[dict]:
    """What pip would install on top of this interpreter (+ pythonpath): [{name, version, ...}].

    Raises EnvBuildError naming the package pip could not find, or the CUDA-only package the
    resolution would pull.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        cons = Path(tmp) / "c.txt"
        cons.write_text("torch==" + _torch_version() + "\n")
        args = ["install", "--dry-run", "--quiet", "--report", str(report), "-c", str(cons)]
        if no_deps:
            args += ["--no-deps", "--ignore-installed"]
        env_pp = os.environ.get("PYTHONPATH")
        try:
            if pythonpath:
                os.environ["PYTHONPATH"] = pythonpath
            p = _pip(*args, *reqs)
        finally:
            if env_pp is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env_pp
        if p.returncode != 0:
            raise EnvBuildError(f"cannot resolve {_failed_package(p.stderr, ' '.join(reqs))}: "
                                f"{_last_line(p.stderr)}")
        items = json.loads(report.read_text())["install"]
    out = [{"name": i["metadata"]["name"], "version": i["metadata"]["version"],
            "requires": i["metadata"].get("requires_dist") or []} for i in items]
    bad = [f"{i['name']}=={i['version']}" for i in out if _FORBIDDEN.match(i["name"])]
    if bad and not no_deps:
        raise EnvBuildError(f"refused: resolving {' '.join(reqs)} would install CUDA-only or "
                            f"torch packages {bad}")
    return out


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "WARNING" not in ln]
    return lines[-1][:200] if lines else "(no output)"


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _install_target(target: Path, pins: list[str]) -> None:
    """pip --target --no-deps of exact pins; a failure names the package."""
    p = _pip("install", "--quiet", "--no-deps", "--no-compile", "--target", str(target), *pins,
             timeout=1800)
    if p.returncode != 0:
        raise EnvBuildError(f"installing {_failed_package(p.stderr + p.stdout, ' '.join(pins))} "
                            f"failed: {_last_line(p.stderr)}")


@dataclass
class Manifest:
    version: str
    ok: bool = False
    pins: list[str] = field(default_factory=list)
    transformers: str = ""
    build_s: float = 0.0
    bytes: int = 0
    error: str = ""
    import_s: float = 0.0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


def base_dir(root: Path = ROOT) -> Path:
    return root / "base"


def build_base(root: Path = ROOT, log=print) -> Manifest:  # noqa: ANN001
    """The shared CPU set, once; later calls read the manifest."""
    man_path = root / "base.json"
    if man_path.exists():
        m = Manifest(**json.loads(man_path.read_text()))
        if m.ok and base_dir(root).is_dir():
            return m
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "base.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    items = resolve(BASE)
    pins = [f"{i['name']}=={i['version']}" for i in items] + BASE_NO_DEPS
    log(f"base: installing {len(pins)} packages")
    _install_target(tmp, pins)
    shutil.rmtree(base_dir(root), ignore_errors=True)
    tmp.rename(base_dir(root))
    m = Manifest("base", ok=True, pins=pins, build_s=time.monotonic() - t0,
                 bytes=_du(base_dir(root)))
    m.save(man_path)
    return m


def release_dir(version: str, root: Path = ROOT) -> Path:
    return root / version


def pythonpath(version: str, root: Path = ROOT) -> str:
    """What a worker for this release puts in front of its PYTHONPATH."""
    return os.pathsep.join([str(release_dir(version, root)), str(base_dir(root))])


def torch_extensions_dir(version: str, root: Path = ROOT) -> str:
    """Where a release JIT-compiles its C++ helpers (0.5.15+ page hashing): compiled once by
    the import check, so no run ever waits on a compile or on another rank's compile lock.
    One folder per checkout: a build records the paths it was reached by, so two checkouts
    sharing one `build/` would otherwise recompile over each other."""
    here = hashlib.sha1(str(REPO_ROOT.resolve()).encode()).hexdigest()[:10]
    return str(release_dir(version, root) / ".torch_extensions" / here)


#: a compile lock older than this was left by a process killed mid-compile (a compile takes
#: well under a minute): torch's FileBaton would wait on it for ever
STALE_COMPILE_LOCK_S = 600


def clear_stale_compile_locks(version: str, root: Path = ROOT) -> list[str]:
    """Remove compile locks left by killed processes; returns the ones removed."""
    gone = []
    base = release_dir(version, root) / ".torch_extensions"
    for lock in base.glob("**/lock") if base.exists() else ():
        try:
            if time.time() - lock.stat().st_mtime > STALE_COMPILE_LOCK_S:
                lock.unlink()
                gone.append(str(lock))
        except OSError:
            pass
    return gone


def load_manifest(version: str, root: Path = ROOT) -> Manifest | None:
    p = root / f"{version}.json"
    return Manifest(**json.loads(p.read_text())) if p.exists() else None


def build_release(version: str, root: Path = ROOT, log=print) -> Manifest:  # noqa: ANN001
    """The env of one release (cached). Raises UsageError / CannotJudge / EnvBuildError."""
    parse_release(version)
    check_runnable(version)
    m = load_manifest(version, root)
    if m is not None and m.ok and release_dir(version, root).is_dir():
        return m
    build_base(root, log)
    t0 = time.monotonic()
    man = Manifest(version)
    try:
        try:
            sg = resolve([f"sglang=={version}"], no_deps=True)[0]
        except EnvBuildError as e:
            raise UsageError(f"sglang {version}: no such release on the package index") from e
        pin = next((r.split(";")[0].strip() for r in sg["requires"]
                    if re.match(r"transformers\s*==", r)), "transformers")
        man.transformers = pin.split("==")[-1]
        # what the pinned transformers needs beyond the system and base
        extra = resolve([pin], pythonpath=str(base_dir(root)))
        pins = [f"sglang=={version}"] + [f"{i['name']}=={i['version']}" for i in extra]
        tmp = root / f"{version}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"sglang {version}: installing {' '.join(pins)}")
        _install_target(tmp, pins)
        shutil.rmtree(release_dir(version, root), ignore_errors=True)
        tmp.rename(release_dir(version, root))
        man.pins = pins
        # the import check adds known extras (xgrammar, tvm_ffi) until the chain imports
        for _ in range(len(EXTRAS) + 1):
            missing, secs = import_check(version, root)
            if missing is None:
                man.import_s = secs
                break
            if missing not in EXTRAS:
                raise EnvBuildError(f"sglang {version}: importing the HiCache chain needs package "
                                    f"'{missing}', which this builder does not install")
            log(f"sglang {version}: adding {EXTRAS[missing]}")
            _install_target(release_dir(version, root), [EXTRAS[missing]])
            man.pins.append(EXTRAS[missing])
        else:
            raise EnvBuildError(f"sglang {version}: import still fails after extras")
        man.ok = True
    except (EnvBuildError, UsageError) as e:
        man.error = str(e)
        raise
    finally:
        man.build_s = time.monotonic() - t0
        if release_dir(version, root).is_dir():
            man.bytes = _du(release_dir(version, root))
        if man.ok or not isinstance(_exc(), UsageError):
            man.save(root / f"{version}.json")
    return man


def _exc() -> BaseException | None:
    return sys.exc_info()[1]


_CHECK = """
import sys, time
t = time.monotonic()
from scenarios.sut.sglang import shim
shim.install()
try:
    try:  # what a HiCache server builds: HiRadixCache up to 0.5.20, UnifiedRadixCache after
        import sglang.srt.mem_cache.hiradix_cache  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "sglang.srt.mem_cache.hiradix_cache":
            raise
        import sglang.srt.mem_cache.unified_radix_cache  # noqa: F401
    import sglang.srt.managers.cache_controller  # noqa: F401
except ModuleNotFoundError as e:
    print("MISSING", e.name.split(".")[0]); sys.exit(3)
try:
    from sglang.srt.mem_cache.utils import get_hash_str
except ImportError:
    from sglang.srt.mem_cache.hicache_storage import get_hash_str
get_hash_str([1, 2, 3, 4], None)
print("OK", time.monotonic() - t)
"""


def import_check(version: str, root: Path = ROOT) -> tuple[str | None, float]:
    """(missing top-level module or None, import seconds) of the HiCache chain under the shim."""
    repo = str(REPO_ROOT)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": torch_extensions_dir(version, root),
           "PYTHONPATH": os.pathsep.join(
        [repo, pythonpath(version, root)] + ([os.environ["PYTHONPATH"]]
                                             if os.environ.get("PYTHONPATH") else []))}
    p = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env,
                       timeout=300)
    out = p.stdout.strip().splitlines()
    last = out[-1] if out else ""
    if last.startswith("OK"):
        return None, float(last.split()[1])
    if last.startswith("MISSING"):
        return last.split()[1], 0.0
    raise EnvBuildError(f"sglang {version}: importing the HiCache chain failed: "
                        f"{_last_line(p.stderr)}")


def releases_in_range() -> list[str]:
    """Every published release from 0.5.9 to the newest (one index query)."""
    p = _pip("index", "versions", "sglang", timeout=120)
    m = re.search(r"Available versions: (.*)", p.stdout)
    if not m:
        raise CannotJudge(f"cannot list sglang releases: {_last_line(p.stderr)}")
    vs = [v.strip() for v in m.group(1).split(",")]
    return sorted((v for v in vs if re.fullmatch(r"[\d.]+(post\d+)?", v) and in_range(v)),
                  key=parse_release)


def newest_release() -> str:
    """The newest sglang release on the package index (one query)."""
    vs = releases_in_range()
    if not vs:
        raise CannotJudge("the package index lists no sglang release from 0.5.9 on")
    return vs[-1]


def main(argv: list[str] | None = None) -> int:
    """``python -m scenarios.sut.sglang.envs [VERSION ...]``: build and print each manifest."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m scenarios.sut.sglang.envs")
    ap.add_argument("versions", nargs="*", help="releases (default: every one from 0.5.9)")
    ap.add_argument("--newest", action="store_true",
                    help="only the newest release on the package index")
    args = ap.parse_args(argv)
    if args.newest and args.versions:
        print("give release numbers or --newest, not both", file=sys.stderr)
        return 2
    versions = [newest_release()] if args.newest else (args.versions or releases_in_range())
    code = 0
    b = build_base()
    print(f"base: {b.bytes / 2**20:.0f} MiB, built in {b.build_s:.0f} s")
    for v in versions:
        try:
            m = build_release(v)
            print(f"sglang {v}: ok, transformers {m.transformers}, +{m.bytes / 2**20:.0f} MiB, "
                  f"built in {m.build_s:.0f} s, HiCache import {m.import_s:.1f} s")
        except (UsageError, CannotJudge) as e:
            print(f"sglang {v}: {e}")
            code = max(code, int(e.exit_code))
    return code


if __name__ == "__main__":
    sys.exit(main())
