"""The C++ CPU kernels: paged attention reading K/V in place (`model.attention.cpu`), the small-batch
matmul of decode and verification steps (`model.parallel.linear`), the same over weights kept in their GGUF
blocks (`model.quant`), the decoder layer's fused element-wise
ops (RMSNorm with the residual add, RoPE, the MLP's silu * up; `model.decoder`), and the decoder stack that
runs all of a decode or verification step's layers through them in one call (`CausalLM.forward`).

They are compiled once with the local compiler (about a minute; `scripts/setup.sh` does it ahead) into
`~/.cache/specserve/kernels/<name>_<key>.so`, the key a hash of what makes a binary fit this process: the
sources and their headers, the flags, the torch version and C++ ABI, the Python ABI and the CPU's instruction
sets. Every later load, in any process (a shell, a Ray worker with another PATH and working directory, a
container sharing the home directory), imports that file directly: no ninja and no torch lock file are
involved, so a shell and a Ray worker never rebuild each other's build. The compiler is not part of the key
on purpose: which `c++` a PATH finds changes the speed of the code, not whether it fits.

A build runs in a private temporary folder and the finished .so is renamed into place, so a reader sees a
whole file or none. Concurrent builders are serialised with `fcntl.flock`, which the kernel releases when its
holder dies: a builder killed mid-build (a stopped cluster) cannot leave a lock behind that blocks later
loads, and the next builder removes the folder it left. Without a compiler the engine runs the PyTorch paths,
which give the same results (up to rounding) more slowly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).parent / "csrc" / f
    for f in (
        "bindings.cpp",
        "paged_attention.cpp",
        "small_matmul.cpp",
        "fused_ops.cpp",
        "quant_matmul.cpp",
        "decoder_stack.cpp",
    )
]
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
SMALL_MATMUL_MAX_ROWS = 16  # kMaxRows in small_matmul.cpp; above it oneDNN's GEMM is as fast or faster
QUANT_KERNEL_MAX_ROWS = 64  # kMaxRows in quant_matmul.cpp: its own paths; more rows go to its GEMM by tiles
# PackedWeight.matmul sends up to this many rows to quant_matmul; more get the whole matrix dequantized for one
# GEMM, which re-reads x less (faster from about 400 rows in scripts/bench_kernels.py's packed_matmul); the decoder
# stack's packed limit (kPackedMaxRows in decoder_stack.cpp) is the same
QUANT_MATMUL_MAX_ROWS = 256
LOCK_FILE = "build.lock"
BUILD_PREFIX = "build-"  # temporary build folders inside the cache, removed by the next builder if abandoned

builds = 0  # extensions compiled by this process (the cache hit path never changes it)
_kernels: ModuleType | None = None
_init_lock = threading.Lock()


def cpu_tag() -> str:
    """Short hash of this CPU's instruction sets: the kernels are built with -march=native, so a build cache
    shared between different machines (a home directory on NFS) must not hand one machine's binary to another."""
    flags = platform.machine()
    with contextlib.suppress(OSError):
        flags += next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def kernel_cache_dir() -> Path:
    from model.loader import cache_dir

    return cache_dir() / "kernels"


def build_key(sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    """Hash of everything a built binary depends on, and of nothing that differs between a shell and a Ray
    worker on the same machine (paths, environment variables)."""
    import torch

    h = hashlib.sha256()
    headers = sorted({h for s in sources for h in Path(s).parent.glob("*.h")})  # included, so part of the build
    for source in [*sources, *headers]:
        h.update(Path(source).name.encode() + b"\0" + Path(source).read_bytes() + b"\0")
    abi = [
        list(cflags),
        list(ldflags),
        torch.__version__,
        bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        sys.implementation.cache_tag,
        sysconfig.get_config_var("SOABI"),
        cpu_tag(),
    ]
    h.update(json.dumps(abi).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def build_lock(cache: Path) -> Iterator[None]:
    """Exclusive lock of a build cache. flock is tied to the open file, so the kernel drops it when the holder
    exits or is killed; the fd is not inherited by the compiler processes, which cannot keep it alive."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building the CPU kernels in %s; waiting for it", cache)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _import(name: str, path: Path) -> ModuleType:
    import torch  # noqa: F401 - the extension links libtorch, which must be loaded first

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str], target: Path):
    """Compile into a private folder and rename the .so into place; the caller holds the build lock, so any
    other build folder belongs to a builder that died."""
    global builds
    from torch.utils import cpp_extension

    for abandoned in target.parent.glob(BUILD_PREFIX + "*"):
        shutil.rmtree(abandoned, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{name}-", dir=target.parent))
    try:
        log.warning("building the CPU kernels into %s (about a minute, once)", target)
        module = cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(tmp),
        )
        os.replace(tmp / f"{name}.so", target)
        builds += 1
        return module
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_extension(
    prefix: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str], cache: Path | None = None
) -> ModuleType:
    """The extension built from `sources`: imported from the cache if it holds this build, else built once
    (concurrent callers wait for the one building, then import its result)."""
    name = f"{prefix}_{build_key(sources, cflags, ldflags)}"
    target = (cache or kernel_cache_dir()) / f"{name}.so"
    if not target.exists():
        with build_lock(target.parent):
            if not target.exists():
                return _build(name, sources, cflags, ldflags, target)
    return _import(name, target)


def load_kernels(required: bool = True) -> ModuleType | None:
    """Load (building once if needed) the kernels; None if they cannot be built and are not `required`."""
    global _kernels
    with _init_lock:
        if _kernels is None:
            try:
                _kernels = load_extension("specserve_cpu_kernels", SOURCES, CFLAGS, LDFLAGS)
            except Exception as e:  # no compiler, no ninja, a build error: the caller decides
                if required:
                    raise RuntimeError(f"cannot build the CPU kernels: {e}") from e
                log.warning("CPU kernels unavailable (%s); using the PyTorch paths", e)
                return None
    return _kernels
