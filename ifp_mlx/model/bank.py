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
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from ..errors import IFPError

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
        return row_width(self.weight.shape[-1], self.bits)


def row_width(entries: int, bits: Optional[int]) -> int:
    """d of a record row stored as ``entries`` values: floats, or packed 32-bit
    words of ``bits``-bit values when quantized."""
    return entries if bits is None else entries * 32 // bits


Layers = Union[mx.array, list[mx.array]]


@dataclass
class CompactFFN:
    """The gathered submodel FFN of every layer (width k).

    Each field is one stacked array ``[L, ...]`` (a gather from the resident
    bank, one dispatch) or a list of L per-layer arrays (built a layer at a time
    from disk, so no layer is ever held twice); ``field[i]`` is layer i either way.
    """

    gate_up: Layers  # [L, 2k, W]
    down_t: Layers  # [L, k, W]
    gate_up_scales: Optional[Layers] = None
    gate_up_biases: Optional[Layers] = None
    down_t_scales: Optional[Layers] = None
    down_t_biases: Optional[Layers] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None

    @property
    def k(self) -> int:
        return self.down_t[0].shape[0]

    def arrays(self) -> list[mx.array]:
        values = [v for v in vars(self).values() if isinstance(v, (mx.array, list))]
        return [a for v in values for a in (v if isinstance(v, list) else [v])]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    @property
    def quantized(self) -> bool:
        return self.bits is not None


def channel_records(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """One layer's HF-layout FFN (gate/up ``[d_ff, d]``, down ``[d, d_ff]``) -> ``[d_ff, 3, d]``."""
    return np.stack([gate, up, down.T], axis=1)


def check_indices(indices: mx.array, num_layers: int, d_ff: int, what: str = "the selection") -> mx.array:
    """A selection ``[L, k]`` as uint32, refused (one line) when a channel is out of range.

    Checked once where a selection enters the engine or a mask file is read: the
    gathers themselves trust their indices (an index >= d_ff would read the next
    layer's records, or past the end of the bank).
    """
    if indices.ndim != 2 or indices.shape[0] != num_layers or indices.shape[1] < 1:
        raise IFPError(f"{what} must be [layers={num_layers}, k], got shape {tuple(indices.shape)}")
    if indices.shape[1] > d_ff:
        raise IFPError(f"{what} keeps {indices.shape[1]} channels per layer, but the model has {d_ff}")
    if mx.issubdtype(indices.dtype, mx.floating):
        raise IFPError(f"{what} holds {indices.dtype} values, not channel numbers")
    low, high = int(indices.min().item()), int(indices.max().item())
    if low < 0 or high >= d_ff:
        bad = low if low < 0 else high
        raise IFPError(f"{what} names channel {bad}, outside 0..{d_ff - 1} (the model's FFN width is {d_ff})")
    return indices.astype(mx.uint32)


def _record_rows(indices: mx.array, d_ff: int) -> tuple[mx.array, mx.array]:
    """Row numbers, in the bank seen as ``[L * d_ff * 3, W]``, of the selected
    gate and up rows ``[L, 2k]`` and down rows ``[L, k]``."""
    layers = mx.arange(indices.shape[0], dtype=mx.uint32)[:, None]
    record = (indices.astype(mx.uint32) + layers * d_ff) * 3
    gate_up = mx.concatenate([record + GATE, record + UP], axis=1)
    return gate_up, record + DOWN


def _take_rows(a: mx.array, rows: mx.array) -> mx.array:
    """``[L, d_ff, 3, X]`` -> ``[L, n, X]``: one row gather, no split copies."""
    return mx.take(a.reshape(-1, a.shape[-1]), rows, axis=0)


def gather_rows(bank: Bank, indices: mx.array) -> CompactFFN:
    """The portable gather: the selected records' rows with ``mx.take`` (any device).

    It is the reference every other gather (the Metal kernels, reads from disk)
    must match bit for bit. ``indices [L, k]`` must already be checked.
    """
    gate_up, down = _record_rows(indices, bank.d_ff)
    arrays = [_take_rows(bank.weight, gate_up), _take_rows(bank.weight, down)]
    if bank.quantized:
        arrays += [_take_rows(bank.scales, gate_up), _take_rows(bank.biases, gate_up)]
        arrays += [_take_rows(bank.scales, down), _take_rows(bank.biases, down)]
    return compact(bank, arrays)


def compact(bank: Bank, arrays: list[mx.array]) -> CompactFFN:
    """Gathered arrays in CompactFFN field order (gate_up, down_t, gate_up_scales,
    gate_up_biases, down_t_scales, down_t_biases) as a CompactFFN of the bank's format."""
    if not bank.quantized:
        return CompactFFN(*arrays)
    return CompactFFN(*arrays, bits=bank.bits, group_size=bank.group_size)


def dense_ffn(bank: Bank) -> CompactFFN:
    """Every channel in order: the dense model, in the compact layout."""
    indices = mx.broadcast_to(mx.arange(bank.d_ff, dtype=mx.uint32), (bank.num_layers, bank.d_ff))
    return gather_rows(bank, indices)


def quantize_records(records: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """Affine-quantize float records ``[..., 3, d]`` along d (weight, scales, biases)."""
    return mx.quantize(records, group_size=group_size, bits=bits)
