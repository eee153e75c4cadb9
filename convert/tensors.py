"""A lazily read source tensor: every checkpoint reader yields these.

Readers only parse headers up front; ``read()`` pulls one tensor's bytes so the
converter can work tensor by tensor and keep peak memory near one tensor.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "float16" | "bfloat16" | a GGUF type name, ...
    read: Callable[[], np.ndarray]  # returns float32 for bf16/quantized sources
    nbytes: int = 0  # bytes in the source file, for progress reporting


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even (NaN kept)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out
