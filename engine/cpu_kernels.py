"""The C++ CPU kernels: paged attention reading K/V in place (`kv_cache.cpu_attention`), the small-batch
matmul of decode and verification steps (`engine.parallel.linear`) and the decoder layer's fused element-wise
ops (RMSNorm with the residual add, RoPE, the MLP's silu * up; `engine.model`).

They are compiled on first use with the local compiler (about a minute; `scripts/setup.sh` does it ahead) and
cached by torch's extension builder under ~/.cache/torch_extensions. Without a compiler the engine runs the
PyTorch paths, which give the same results (up to rounding) more slowly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).parent / "csrc" / f
    for f in ("bindings.cpp", "paged_attention.cpp", "small_matmul.cpp", "fused_ops.cpp")
]
SMALL_MATMUL_MAX_ROWS = 16  # kMaxRows in small_matmul.cpp; above it oneDNN's GEMM is as fast or faster
_kernels: ModuleType | None = None


def cpu_tag() -> str:
    """Short hash of this CPU's instruction sets: the kernels are built with -march=native, so a build cache
    shared between different machines (a home directory on NFS) must not hand one machine's binary to another."""
    flags = platform.machine()
    with contextlib.suppress(OSError):
        flags += next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def load_kernels(required: bool = True) -> ModuleType | None:
    """Build or load the kernels; None if they cannot be built and are not `required`."""
    global _kernels
    if _kernels is None:
        from torch.utils import cpp_extension

        try:
            _kernels = cpp_extension.load(
                name=f"specserve_cpu_kernels_{cpu_tag()}",
                sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
        except Exception as e:  # no compiler, no ninja, a build error: the caller decides
            if required:
                raise RuntimeError(f"cannot build the CPU kernels: {e}") from e
            log.warning("CPU kernels unavailable (%s); using the PyTorch paths", e)
            return None
    return _kernels
