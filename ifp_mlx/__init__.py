"""ifp-mlx: Instruction-Following Pruning on MLX."""

from . import blas as _blas

_blas.preload_openblas()

__version__ = "0.1.0"
