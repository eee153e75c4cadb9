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


def available_backend() -> str:
    return METAL if mx.metal.is_available() else PORTABLE


_state = {"backend": available_backend(), "fallback_reason": None}


def backend() -> str:
    """The backend gathers use now (``portable`` after a Metal failure)."""
    return _state["backend"]


def fallback_reason() -> str | None:
    """Why the Metal kernels are not in use on a Mac, once they failed."""
    return _state["fallback_reason"]


def fall_back(reason: str) -> None:
    """Use the portable gather from now on, saying why once."""
    if _state["backend"] == METAL:
        _state["backend"], _state["fallback_reason"] = PORTABLE, reason
        print(f"warning: the Metal gather kernel failed ({reason}); using the portable gather", file=sys.stderr)


def gather(bank: Bank, indices: mx.array) -> CompactFFN:
    """Gather the selected channels ``indices [L, k]`` (checked, uint32) of every layer."""
    if _state["backend"] == METAL:
        try:
            ffn = gather_metal(bank, indices)
            mx.eval(ffn.arrays())
            return ffn
        except (RuntimeError, ValueError) as e:
            fall_back(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return gather_rows(bank, indices)
