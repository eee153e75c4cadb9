"""The compact FFN module that replaces every layer's MLP.

It computes the FFN from gathered channel records (``ifp_mlx.bank``): one
matmul for gate and up together, the activation, then the transposed down
projection. The same module serves the dense model (all channels) and every
pruned submodel, so switching selections only swaps arrays, never modules.
"""

from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from .bank import CompactFFN, row_width


def _geglu(gate: mx.array, x: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * x


GLU = {"silu": swiglu, "gelu_approx": _geglu}
# The FFN's LoRA updates, as CompactMLP children: beside gate_up, and beside down_t.
FFN_ADAPTERS = ("gate_up_lora", "down_lora")


class LowRank(nn.Module):
    """``scale * x @ lora_a @ lora_b``: a LoRA update beside one of the FFN's matmuls.

    The compact FFN has no ``nn.Linear`` for mlx-lm's ``LoRALinear`` to wrap (its
    weights are gathered channel records, and change with every selection), so
    the update is its own module. Its factors are laid out by channel like the
    records (``gate_up``'s ``lora_b`` columns: d_ff gate channels then d_ff up
    channels; ``down``'s ``lora_a`` rows: one per channel), so a submodel's update
    is the same slice of them as its weights are of the bank.
    """

    def __init__(self, lora_a: mx.array, lora_b: mx.array, scale: float):
        super().__init__()
        self.lora_a, self.lora_b, self.scale = lora_a, lora_b, scale

    def __call__(self, x: mx.array) -> mx.array:
        return (self.scale * ((x @ self.lora_a) @ self.lora_b)).astype(x.dtype)


def layer_of(field: Union[mx.array, list[mx.array]], i: int) -> mx.array:
    """Layer i of a CompactFFN field, as a view.

    ``a[i]`` on an MLX array copies (it is a gather); a slice is a view of the
    same buffer. Indexing would keep a second copy of every submodel.
    """
    if isinstance(field, list):
        return field[i]
    return field[i : i + 1].reshape(field.shape[1:])


class CompactMLP(nn.Module):
    def __init__(self, activation: str, layer: int):
        super().__init__()
        if activation not in GLU:
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.layer = layer
        self.bits: Optional[int] = None
        self.group_size: Optional[int] = None
        # Called with (layer, activations [..., k]) during a scoring pass.
        self.observer: Optional[Callable[[int, mx.array], None]] = None
        # Multiplies the activations: zeroes channels (reference) or soft masks (training).
        self.channel_mask: Optional[mx.array] = None
        # Builds this layer's dense FFN from the bank per call (dense passes, no dense copy kept).
        self.records: Optional[Callable[[], CompactFFN]] = None

    def assign(self, ffn: CompactFFN) -> None:
        """Point this layer at its slice of a gathered compact FFN."""
        self.records = None
        self._set(ffn, self.layer)

    def assign_records(self, records: Callable[[], CompactFFN]) -> None:
        """Compute every channel from the bank, building this layer's dense FFN
        (``records()``, a one-layer CompactFFN) afresh in each call and dropping it after.

        For dense *passes* (activation scoring, calibration): a transient
        layer-sized copy per call instead of a dense copy of the whole FFN kept
        beside the bank.
        """
        self.unassign()
        self.records = records

    def unassign(self) -> None:
        """Drop this layer's arrays (its submodel's memory is freed with the last reference)."""
        self.records = None
        for name in ("gate_up", "down_t", "gate_up_scales", "gate_up_biases", "down_t_scales", "down_t_biases"):
            if name in self:
                del self[name]

    def _set(self, ffn: CompactFFN, i: int) -> None:
        self.gate_up = layer_of(ffn.gate_up, i)
        self.down_t = layer_of(ffn.down_t, i)
        self.bits, self.group_size = ffn.bits, ffn.group_size
        if ffn.quantized:
            self.gate_up_scales, self.gate_up_biases = layer_of(ffn.gate_up_scales, i), layer_of(ffn.gate_up_biases, i)
            self.down_t_scales, self.down_t_biases = layer_of(ffn.down_t_scales, i), layer_of(ffn.down_t_biases, i)

    @property
    def width(self) -> int:
        return self.down_t.shape[0]

    @property
    def hidden_size(self) -> int:
        return row_width(self.down_t.shape[-1], self.bits)

    def __call__(self, x: mx.array) -> mx.array:
        if self.records is not None:
            return self._call_records(x)
        gate_up = self._project(x, "gate_up", transpose=True)
        if "gate_up_lora" in self:
            gate_up = gate_up + self.gate_up_lora(x)
        gate, up = mx.split(gate_up, 2, axis=-1)
        hidden = GLU[self.activation](gate, up)
        if self.channel_mask is not None:
            hidden = hidden * self.channel_mask
        if self.observer is not None:
            self.observer(self.layer, hidden)
        out = self._project(hidden, "down_t", transpose=False)
        if "down_lora" in self:
            out = out + self.down_lora(hidden)
        return out

    def _project(self, x: mx.array, name: str, transpose: bool) -> mx.array:
        """``x`` times the ``name`` rows (``gate_up``: transposed), float or quantized."""
        weight = self[name]
        if self.bits is None:
            return x @ (weight.T if transpose else weight)
        return mx.quantized_matmul(
            x, weight, self[f"{name}_scales"], self[f"{name}_biases"],
            transpose=transpose, group_size=self.group_size, bits=self.bits,
        )

    def _call_records(self, x: mx.array) -> mx.array:
        """One call on a layer built from the bank, then dropped (see assign_records)."""
        records = self.records
        self.records = None
        try:
            self._set(records(), 0)
            out = self(x)
            mx.eval(out)  # now, so only this layer's copy is ever alive
            return out
        finally:
            self.assign_records(records)
