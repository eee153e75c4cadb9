"""Hand memory the process has freed back to the operating system.

MLX's buffer cache and glibc's malloc both keep freed memory for reuse. After
a gather or a disk read that is the selection's transient buffers, which would
otherwise stay in the process's resident memory for the rest of the run: on
Linux, glibc raises its mmap threshold after the first large free, so later
read buffers come from the heap, and ``free`` rarely shrinks it. ``malloc_trim``
returns those pages. Elsewhere (macOS' allocator returns large blocks itself)
only MLX's cache is cleared.
"""

import ctypes
import ctypes.util
import sys
from functools import lru_cache
from typing import Optional

import mlx.core as mx


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_free_memory() -> None:
    """Empty MLX's buffer cache and, with glibc, trim the malloc heap."""
    mx.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
