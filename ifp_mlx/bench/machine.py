"""The process's peak resident memory, per benchmark row, and what machine ran it.

``ru_maxrss`` only ever grows, so on its own it would report every row at the
peak of the biggest row before it. On Linux, writing ``5`` to
``/proc/self/clear_refs`` resets the process's peak (``VmHWM``) to its current
resident size, so each row's peak is its own. Elsewhere the peak cannot be
reset: the figure is the process peak so far, and the results say so.
"""

import os
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Optional

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def can_reset_peak_rss() -> bool:
    return CLEAR_REFS.exists() and STATUS.exists()


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS; False where that is impossible."""
    if not can_reset_peak_rss():
        return False
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _status_kb(field: str) -> Optional[int]:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M)
    return int(match.group(1)) if match else None


def peak_rss_bytes() -> int:
    """The process's peak resident memory: VmHWM on Linux, else ``ru_maxrss``."""
    if STATUS.exists():
        kb = _status_kb("VmHWM")
        if kb is not None:
            return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> Optional[int]:
    """The process's resident memory now (Linux only)."""
    kb = _status_kb("VmRSS") if STATUS.exists() else None
    return None if kb is None else kb * 1024


def rss_method() -> str:
    """How the peak RSS figures were taken, for the results."""
    if can_reset_peak_rss():
        return "VmHWM, reset per row through /proc/self/clear_refs"
    return "ru_maxrss: the process peak so far (it cannot be reset here), not each row's own"


def evict_from_page_cache(path: Path) -> bool:
    """Drop a file's pages from the OS page cache, so the next read comes from the disk.

    ``posix_fadvise(DONTNEED)`` needs no privileges; it is a request the kernel
    may partly ignore (and a virtual disk may still hit the host's cache).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    """What ran the benchmark: enough to tell two machines' results apart."""
    import mlx.core as mx

    from ..blas import global_blas_library

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "ifp_mlx": _version("ifp-mlx"),
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "blas": global_blas_library(),
        "peak_rss": rss_method(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if info["metal"]:
        info["gpu"] = mx.metal.device_info().get("device_name")
    return info
