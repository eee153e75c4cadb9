"""The FFN bank: every layer's FFN channels stored as contiguous records.

Channel j of layer l is three length-d vectors: row j of gate, row j of up and
column j of down. The bank stores them as one record ``[3, W]`` ("row-column
bundling"), with down transposed, so selecting channels is a row gather along
axis 1 of ``[L, d_ff, 3, W]``. Quantized banks are quantized along d: row j's
packed words (W = d * bits / 32), scales and biases (``[L, d_ff, 3, d / g]``)
are gathered by the same indices.

A compact FFN holds the gathered channels as ``gate_up [L, 2k, W]`` (k gate rows
then k up rows: one matmul computes both) and ``down_t [L, k, W]``.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

GATE, UP, DOWN = 0, 1, 2


@dataclass
class Bank:
    """Stacked channel records of every layer, float or affine-quantized."""

    weight: mx.array  # [L, d_ff, 3, W]
    scales: Optional[mx.array] = None  # [L, d_ff, 3, d / group_size]
    biases: Optional[mx.array] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def d_ff(self) -> int:
        return self.weight.shape[1]

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def hidden_size(self) -> int:
        if self.quantized:
            return self.weight.shape[-1] * 32 // self.bits
        return self.weight.shape[-1]


@dataclass
class CompactFFN:
    """The gathered submodel FFN of every layer (width k)."""

    gate_up: mx.array  # [L, 2k, W]
    down_t: mx.array  # [L, k, W]
    gate_up_scales: Optional[mx.array] = None
    gate_up_biases: Optional[mx.array] = None
    down_t_scales: Optional[mx.array] = None
    down_t_biases: Optional[mx.array] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None

    @property
    def k(self) -> int:
        return self.down_t.shape[1]

    def arrays(self) -> list[mx.array]:
        return [v for v in vars(self).values() if isinstance(v, mx.array)]

    @property
    def quantized(self) -> bool:
        return self.bits is not None


def channel_records(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """One layer's HF-layout FFN (gate/up ``[d_ff, d]``, down ``[d, d_ff]``) -> ``[d_ff, 3, d]``."""
    return np.stack([gate, up, down.T], axis=1)



def quantize_records(records: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """Affine-quantize float records ``[..., 3, d]`` along d (weight, scales, biases)."""
    return mx.quantize(records, group_size=group_size, bits=bits)
