"""Which gather runs: the Metal kernels on an Apple GPU, ``mx.take`` elsewhere.

Both produce the same :class:`CompactFFN`, bit for bit. The backend is chosen
from ``mx.metal.is_available()``: creating a Metal kernel works everywhere, but
calling one without Metal raises, and catching that would hide real kernel
errors. On a Mac a kernel that fails to compile or launch (a driver or MLX
version it was never run on) falls back to the portable path for the rest of
the process, with one warning line: a gather never crashes a generation.
"""

import sys

import mlx.core as mx

from ..model.bank import Bank, CompactFFN, gather_rows
from .metal import gather_metal

METAL = "metal"
PORTABLE = "portable"

# What a failing kernel raises: MLX turns a Metal compile or pipeline error
# into RuntimeError and a launch it refuses into ValueError; an MLX whose
# metal_kernel takes other arguments raises TypeError.
KERNEL_ERRORS = (RuntimeError, ValueError, TypeError)


def available_backend() -> str:
    """``metal`` where MLX has a Metal device, else ``portable``."""
    return METAL if mx.metal.is_available() else PORTABLE


_state = {"backend": available_backend(), "fallback_reason": None}


def backend() -> str:
    """The backend gathers use now (``portable`` after a Metal failure)."""
    return _state["backend"]


def fallback_reason() -> str | None:
    """Why the Metal kernels are not in use on a Mac, once they failed."""
    return _state["fallback_reason"]


def one_line(error: BaseException) -> str:
    """An exception as one line: MLX's first line, plus the compiler's first error.

    A Metal compile failure reads "[metal::Device] Unable to build metal library
    from source" followed by the compiler's log; its first ``error:`` line is the
    part worth reading.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first_error = next((line for line in lines[1:] if "error:" in line), None)
    return f"{lines[0]} {first_error}" if first_error else lines[0]


def fall_back(reason: str) -> None:
    """Use the portable gather from now on, saying why once."""
    if _state["backend"] == METAL:
        _state["backend"], _state["fallback_reason"] = PORTABLE, reason
        print(
            f"warning: the Metal gather kernel failed ({reason}); using the portable gather",
            file=sys.stderr,
            flush=True,
        )


def gather(bank: Bank, indices: mx.array) -> CompactFFN:
    """Gather the selected channels ``indices [L, k]`` (checked, uint32) of every layer.

    The Metal result is evaluated here, inside the ``try``: MLX compiles a
    kernel lazily, so a compile error surfaces at evaluation, not at the call.
    """
    if _state["backend"] == METAL:
        try:
            ffn = gather_metal(bank, indices)
            mx.eval(ffn.arrays())
            return ffn
        except KERNEL_ERRORS as e:
            fall_back(one_line(e))
    return gather_rows(bank, indices)
