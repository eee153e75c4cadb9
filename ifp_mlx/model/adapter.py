"""LoRA adapters that ride with a predictor and apply only to pruned submodels.

A predictor trained jointly with the LLM (IFPruning's SFT through the masked
model) comes with low-rank adapters on the attention projections and/or the
FFN, trained for one keep ratio. They belong to the pruned model: a dense run
must stay bit-identical to the model without them. So the adapters are not
merged into the weights (a merged float weight rounds differently): each
adapted attention linear is wrapped in mlx-lm's ``LoRALinear`` while a pruned
submodel is in use, and the original linear is put back for dense runs. The
FFN's updates (``ifp_mlx.model.ffn.LowRank``) follow the submodel: when one is
built, each layer gets the slice of its factors that belongs to the selected
channels, so the pruned model computes exactly what the masked model it was
trained as computes. The cost per token is the adapters' own small matmuls.

On disk, beside the predictor's head: ``adapter.safetensors`` (mlx-lm's names,
``model.layers.N.self_attn.q_proj.lora_a`` / ``lora_b``; the FFN's
``model.layers.N.mlp.gate_up_lora.lora_a`` ...) and an ``adapter`` block in the
predictor's ``config.json`` (rank, scale, keep).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from ..errors import IFPError
from .ffn import FFN_ADAPTERS, LowRank

ADAPTER_FILE = "adapter.safetensors"
# The adapter adds ``LORA_SCALE * x @ A @ B``: the scale the trainer has always used,
# passed explicitly because mlx-lm's default (20.0) would weigh the same A, B ten times more.
LORA_SCALE = 2.0


@dataclass
class Adapter:
    """LoRA weights by linear (``model.layers.3.self_attn.q_proj``), and how to scale them."""

    weights: dict[str, tuple[mx.array, mx.array]]  # linear path -> (lora_a, lora_b)
    scale: float
    keep: Optional[float] = None  # the keep ratio it was trained for
    _base: Optional[dict[str, nn.Module]] = None  # the unwrapped linears while enabled
    _ffn_for: Optional[tuple] = None  # (indices,) the FFN updates are sliced for, while enabled

    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))[0].shape[1]

    @property
    def targets(self) -> list[str]:
        """What it adapts: ``attention``, ``ffn`` or both."""
        ffn = [is_ffn_adapter(path) for path in self.weights]
        return [name for name, present in (("attention", not all(ffn)), ("ffn", any(ffn))) if present]

    def enable(self, model: nn.Module, indices: Optional[mx.array] = None) -> None:
        """Wrap each adapted attention linear of ``model`` in a LoRALinear holding
        these weights, and give the FFN the updates of the channels ``indices``
        ``[L, k]`` keep (None: every channel, the masked reference's full width)."""
        if self._ffn_for is not None and self._ffn_for[0] is indices:
            return  # enabled for this selection already (a cached submodel, a conversation's next turn)
        modules = dict(model.named_modules())
        if self._base is None:
            self._base, wrapped = {}, []
            for path, (a, b) in self.weights.items():
                if is_ffn_adapter(path):
                    continue
                base = _module(modules, path)
                lora = LoRALinear.from_base(base, r=a.shape[1], scale=self.scale, dropout=0.0)
                lora.lora_a, lora.lora_b = a, b
                self._base[path] = base
                wrapped.append((path, lora))
            if wrapped:
                model.update_modules(tree_unflatten(wrapped))
        for path, (a, b) in self.weights.items():
            if is_ffn_adapter(path):
                mlp_path, _, name = path.rpartition(".")
                mlp = _module(modules, mlp_path)
                rows = None if indices is None else indices[mlp.layer]
                setattr(mlp, name, LowRank(*ffn_slice(name, a, b, rows), self.scale))
        self._ffn_for = (indices,)

    def disable(self, model: nn.Module) -> None:
        """Put the original linears back and take the FFN's updates off: the model
        is exactly the one without an adapter."""
        if self._base is None:
            return
        if self._base:
            model.update_modules(tree_unflatten(list(self._base.items())))
        modules = dict(model.named_modules())
        for path in self.weights:
            mlp_path, _, name = path.rpartition(".")
            if is_ffn_adapter(path) and name in modules[mlp_path]:
                del modules[mlp_path][name]
        self._base = self._ffn_for = None


def is_ffn_adapter(path: str) -> bool:
    return path.rpartition(".")[2] in FFN_ADAPTERS


def ffn_slice(name: str, a: mx.array, b: mx.array, channels: Optional[mx.array]) -> tuple[mx.array, mx.array]:
    """An FFN update's factors for the channels a submodel keeps (``None``: all), in
    the compact layout: ``gate_up``'s k gate columns then k up columns, ``down``'s k rows."""
    if channels is None:
        return a, b
    if name == "gate_up_lora":
        d_ff = b.shape[1] // 2
        return a, mx.take(b, mx.concatenate([channels, channels + d_ff]), axis=1)
    return mx.take(a, channels, axis=0), b


def _module(modules: dict[str, nn.Module], path: str) -> nn.Module:
    module = modules.get(path)
    if module is None:
        raise IFPError(f"the adapter names {path}, which this model does not have")
    return module


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA parameters of a model being trained, under the names saved on disk."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def save_adapter(folder: Path, model: nn.Module) -> int:
    """Write ``model``'s LoRA weights into ``folder``; returns how many linears are adapted."""
    weights = adapter_weights(model)
    if not weights:
        raise IFPError("the model has no LoRA adapters to save")
    mx.save_safetensors(str(folder / ADAPTER_FILE), weights, metadata={"format": "mlx"})
    return len(weights) // 2


def load_adapter(folder: Path, config: dict) -> Optional[Adapter]:
    """The adapter of a predictor folder, or None when it has none."""
    info = config.get("adapter")
    if info is None:
        return None
    path = folder / ADAPTER_FILE
    try:
        arrays = mx.load(str(path))
    except (ValueError, RuntimeError, FileNotFoundError):
        raise IFPError(f"{path}: the predictor's adapter file is missing or not safetensors")
    weights = {}
    for name in arrays:
        linear, _, part = name.rpartition(".")
        if part == "lora_a":
            b = arrays.get(f"{linear}.lora_b")
            if b is None or arrays[name].shape[1] != b.shape[0]:
                raise IFPError(f"{path}: {linear} has no matching lora_b")
            weights[linear] = (arrays[name].astype(mx.float32), b.astype(mx.float32))
    if not weights:
        raise IFPError(f"{path}: no LoRA weights")
    return Adapter(weights, float(info.get("scale", LORA_SCALE)), info.get("keep"))
