"""Load an ifp model folder into an mlx-lm model whose MLPs are CompactMLPs.

mlx-lm supplies the model classes, tokenizer and chat template; only each
layer's ``mlp`` is replaced. The FFN bank is opened lazily (``mx.load`` reads
a tensor only when it is evaluated), and the dense weights, or a gathered
submodel, are assigned to the CompactMLPs afterwards.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load_tokenizer

from ..errors import IFPError
from .bank import Bank, CompactFFN, dense_ffn
from .families import UnsupportedFamily, family_for
from .ffn import CompactMLP


@dataclass
class LoadedModel:
    path: Path
    config: dict
    model: nn.Module
    tokenizer: TokenizerWrapper
    mlps: list[CompactMLP]
    dense: Optional[CompactFFN] = None  # every channel, once built
    resident_bank: Optional[Bank] = None  # the bank, once something gathers from it

    @property
    def ifp(self) -> dict:
        return self.config["ifp"]

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    @property
    def d_ff(self) -> int:
        return self.ifp["bank"]["d_ff"]

    def bank(self) -> Bank:
        """The FFN bank, read once and kept in memory (gathers come from it)."""
        if self.resident_bank is None:
            self.resident_bank = self._read_bank()
            mx.eval(self.resident_bank.weight, self.resident_bank.scales, self.resident_bank.biases)
        return self.resident_bank

    def _read_bank(self) -> Bank:
        """The FFN bank, lazily loaded (evaluating it reads the file)."""
        arrays = mx.load(str(self.path / self.ifp["bank"]["file"]))
        quant = self.ifp.get("quantization")
        if quant:
            return Bank(arrays["bank.weight"], arrays["bank.scales"], arrays["bank.biases"], quant["bits"], quant["group_size"])
        return Bank(arrays["bank.weight"])

    def dense_ffn(self) -> CompactFFN:
        """Every channel (built from the bank once, then kept)."""
        if self.dense is None:
            # A dense-only session never needs the bank itself: read it transiently.
            self.dense = dense_ffn(self.resident_bank or self._read_bank())
            mx.eval(self.dense.arrays())
        return self.dense

    def assign(self, ffn: CompactFFN) -> None:
        """Make every layer compute with ``ffn`` (dense or a gathered submodel)."""
        for mlp in self.mlps:
            mlp.assign(ffn)


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise IFPError(f"{path} is not a model folder (no config.json)")
    config = json.loads(config_file.read_text())
    if "ifp" not in config:
        raise IFPError(f"{path} is not an ifp model folder: convert it first with `ifp convert`")
    return config


def load(path: str | Path, dense: bool = True) -> LoadedModel:
    """Load a model folder. With ``dense`` the full FFN is assigned and evaluated."""
    path = Path(path)
    config = read_config(path)
    try:
        family = family_for(config)
    except UnsupportedFamily as e:
        raise IFPError(f"{path}: {e}")
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mlps = [CompactMLP(family.activation, i) for i in range(len(model.layers))]
    for layer, mlp in zip(model.layers, mlps):
        layer.mlp = mlp
    weights = mx.load(str(path / config["ifp"]["weights"]))
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    if quant := config.get("quantization"):
        nn.quantize(
            model, group_size=quant["group_size"], bits=quant["bits"],
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
        )
    _load_weights(model, weights, path)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    loaded = LoadedModel(path, config, model, tokenizer, mlps)
    # The non-FFN weights first: building the dense FFN while they are still lazy
    # keeps the whole bank alive beside its dense copy (857 MB live for SmolLM2's
    # 542 MB fp32 files, against 538 MB in this order).
    mx.eval(model.parameters())
    if dense:
        loaded.assign(loaded.dense_ffn())
    return loaded


def _load_weights(model: nn.Module, weights: dict, path: Path) -> None:
    """load_weights(strict=False), then check nothing but the MLPs is missing."""
    model.load_weights(list(weights.items()), strict=False)
    from mlx.utils import tree_flatten

    expected = {k for k, _ in tree_flatten(model.parameters()) if ".mlp." not in k}
    missing = sorted(expected - set(weights))
    if missing:
        raise IFPError(f"{path}: weights missing from {path.name}: {', '.join(missing[:3])}")
