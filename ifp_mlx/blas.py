"""Use a fast BLAS under MLX's Linux CPU wheel.

The Linux wheel links netlib's reference BLAS (~4 GFLOPS sgemm). Loading an
optimised OpenBLAS into the global symbol namespace before ``mlx.core`` is
imported makes MLX resolve its BLAS calls there instead: ~10x faster matmuls,
identical outputs. It must run before the first ``import mlx.core``, which is
why ``ifp_mlx/__init__.py`` calls it first. Set ``IFP_NO_OPENBLAS=1`` to opt out.

Too late, nothing can be done (Python loads extensions with RTLD_NOW, so MLX's
BLAS symbols are bound when ``mlx.core`` is imported) except say so once: a
script that imports ``mlx.core`` first would otherwise just run 10-17x slower.
"""

import ctypes
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_warned = False


def preload_openblas() -> str | None:
    """Load OpenBLAS globally on Linux; returns the path loaded, if any.

    Warns once on stderr when ``mlx.core`` was imported first and is bound to
    the slow BLAS, since then preloading cannot help.
    """
    if not sys.platform.startswith("linux") or os.environ.get("IFP_NO_OPENBLAS"):
        return None
    candidate = next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
    if "mlx.core" in sys.modules:
        if candidate is not None and "openblas" not in (global_blas_library() or ""):
            warn_too_late(candidate)
        return None
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            return path
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def global_blas_library() -> str | None:
    """The file that provides ``cblas_sgemm`` in the global namespace, if any.

    That is where MLX's library bound its matmuls when it was loaded (the
    global namespace is searched before its own bundled BLAS), so OpenBLAS
    there, from LD_PRELOAD or an earlier preload, means all is well. A file
    name is asked for rather than "is libopenblas mapped", because numpy's
    wheels map their own renamed OpenBLAS that MLX cannot use.
    """
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        info = _DlInfo()
        if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.path.realpath(info.dli_fname.decode(errors="replace"))
    except (AttributeError, OSError):
        return None


def warn_too_late(openblas: str) -> None:
    """One line on stderr, once per process: what happened, what it costs, how to fix it."""
    global _warned
    if _warned:
        return
    _warned = True
    print(
        "ifp_mlx: warning: mlx.core was imported before ifp_mlx, so MLX uses the slow reference BLAS "
        f"(10-17x slower on CPU); import ifp_mlx first, or run with LD_PRELOAD={openblas} "
        "(IFP_NO_OPENBLAS=1 silences this)",
        file=sys.stderr,
        flush=True,
    )
