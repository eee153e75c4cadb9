"""Use a fast BLAS under MLX's Linux CPU wheel.

The Linux wheel links netlib's reference BLAS (~4 GFLOPS sgemm). Loading an
optimised OpenBLAS into the global symbol namespace before ``mlx.core`` is
imported makes MLX resolve its BLAS calls there instead: ~10x faster matmuls,
identical outputs. It must run before the first ``import mlx.core``, which is
why ``ifp_mlx/__init__.py`` calls it first. Set ``IFP_NO_OPENBLAS=1`` to opt out.
"""

import ctypes
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def preload_openblas() -> str | None:
    """Load OpenBLAS globally on Linux; returns the path loaded, if any."""
    if not sys.platform.startswith("linux") or os.environ.get("IFP_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:
        return None
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            return path
    return None
