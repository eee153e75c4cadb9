"""Load an ifp model folder into an mlx-lm model whose MLPs are CompactMLPs.

mlx-lm supplies the model classes, tokenizer and chat template; only each
layer's ``mlp`` is replaced. The FFN bank is opened lazily (``mx.load`` reads
a tensor only when it is evaluated), and the dense weights, or a gathered
submodel, are assigned to the CompactMLPs afterwards.
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub.errors import StrictDataclassError
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load_tokenizer

from ..errors import IFPError
from .bank import Bank, CompactFFN, dense_ffn
from .adapter import Adapter
from .bank_file import BankFile
from .config_check import ConfigError, check_against_weights, check_config, error_line, parse_config
from .families import family_for
from .ffn import CompactMLP


@dataclass
class LoadedModel:
    """A loaded model folder: the mlx-lm model with CompactMLPs, and its FFN bank.

    Where the FFN comes from depends on the mode:
    - resident (default): the bank is read into memory once, on the first
      gather; pruned submodels are gathered from it; dense passes of the
      selectors compute from it layer by layer (no dense copy kept beside it);
    - ``low_memory``: the bank stays on disk; each selection reads only its
      channel records (:class:`BankFile`), dense passes read a layer at a time;
    - dense generation builds the dense FFN once, a layer at a time from the
      file, without ever holding the bank.
    """

    path: Path
    config: dict
    model: nn.Module
    tokenizer: TokenizerWrapper
    mlps: list[CompactMLP]
    dense: Optional[CompactFFN] = None  # every channel, once built
    resident_bank: Optional[Bank] = None  # the bank, once something gathers from it
    low_memory: bool = False
    _bank_file: Optional[BankFile] = None
    adapter: Optional[Adapter] = None  # the LoRA adapter applied now, if any

    @property
    def ifp(self) -> dict:
        return self.config["ifp"]

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    @property
    def d_ff(self) -> int:
        return self.ifp["bank"]["d_ff"]

    @property
    def bank_path(self) -> Path:
        return self.path / self.ifp["bank"]["file"]

    def bank_file(self) -> BankFile:
        """The bank file opened for positioned reads (its header only is read)."""
        if self._bank_file is None:
            quant = self.ifp.get("quantization") or {}
            self._bank_file = BankFile.open(self.bank_path, quant.get("bits"), quant.get("group_size"))
        return self._bank_file

    def bank(self) -> Bank:
        """The FFN bank, read once and kept in memory (gathers come from it)."""
        if self.low_memory:
            raise IFPError("internal: the resident bank was asked for in --low-memory mode")
        if self.resident_bank is None:
            arrays = mx.load(str(self.bank_path))
            quant = self.ifp.get("quantization")
            if quant:
                bank = Bank(arrays["bank.weight"], arrays["bank.scales"], arrays["bank.biases"], quant["bits"], quant["group_size"])
            else:
                bank = Bank(arrays["bank.weight"])
            mx.eval(bank.weight, bank.scales, bank.biases)
            self.resident_bank = bank
        return self.resident_bank

    def layer_bank(self, layer: int) -> Bank:
        """One layer's records ``[1, d_ff, 3, X]``: a view of the resident bank, else read from disk."""
        bank = self.resident_bank
        if bank is None:
            return self.bank_file().layer(layer)
        pick = slice(layer, layer + 1)
        if not bank.quantized:
            return Bank(bank.weight[pick])
        return Bank(bank.weight[pick], bank.scales[pick], bank.biases[pick], bank.bits, bank.group_size)

    def dense_ffn(self) -> CompactFFN:
        """Every channel (built once, then kept): from the resident bank when it is
        in memory, else a layer at a time from the file, so the bank and its
        dense copy are never both held."""
        if self.dense is None:
            if self.resident_bank is not None:
                self.dense = dense_ffn(self.resident_bank)
                mx.eval(self.dense.arrays())
            else:
                self.dense = stack_layers([self.dense_layer(i) for i in range(self.num_layers)])
        return self.dense

    def dense_layer(self, layer: int) -> CompactFFN:
        """One layer's dense FFN ``[1, ...]``, built and evaluated now (from the
        resident bank, else read from disk straight into its layout)."""
        ffn = dense_ffn(self.layer_bank(layer)) if self.resident_bank is not None else self.bank_file().dense_layer(layer)
        mx.eval(ffn.arrays())
        return ffn

    def dense_pass(self) -> None:
        """Every layer computes all channels, for a scoring pass: with the dense FFN
        when it is built, else from the bank a layer at a time (no dense copy).
        Without adapters: they belong to pruned submodels."""
        self.use_adapter(None)
        if self.dense is not None:
            self.assign(self.dense)
            return
        for mlp in self.mlps:
            mlp.assign_records(partial(self.dense_layer, mlp.layer))

    def use_adapter(self, adapter: Optional[Adapter], indices: Optional[mx.array] = None) -> None:
        """Apply ``adapter`` (None: none), taking off whichever was applied before;
        its FFN updates for the channels ``indices`` keep (None: all of them)."""
        if adapter is not self.adapter and self.adapter is not None:
            self.adapter.disable(self.model)
        if adapter is not None:
            adapter.enable(self.model, indices)
        self.adapter = adapter

    def unassign(self) -> None:
        """No layer holds a submodel (until the next ``assign``)."""
        for mlp in self.mlps:
            mlp.unassign()

    def assign(self, ffn: CompactFFN) -> None:
        """Make every layer compute with ``ffn`` (dense or a gathered submodel)."""
        for mlp in self.mlps:
            mlp.assign(ffn)


def stack_layers(layers: list[CompactFFN]) -> CompactFFN:
    """One CompactFFN whose fields list the layers' own (one-layer) arrays."""
    first = layers[0]
    fields = {name: [getattr(f, name)[0] for f in layers] for name, v in vars(first).items() if isinstance(v, mx.array)}
    return CompactFFN(**fields, bits=first.bits, group_size=first.group_size)


def read_config(path: Path) -> dict:
    """The folder's config.json, every field checked (see config_check): a tampered
    or hand-edited config is one line naming the field, never a traceback."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise IFPError(f"{path} is not a model folder (no config.json)")
    config = parse_config(config_file)
    if "ifp" not in config:
        raise IFPError(f"{path} is not an ifp model folder: convert it first with `ifp convert`")
    check_config(config, config_file)
    return config


def load(path: str | Path, dense: bool = True, low_memory: bool = False) -> LoadedModel:
    """Load a model folder. With ``dense`` the full FFN is assigned and evaluated;
    with ``low_memory`` the FFN bank stays on disk (see :class:`LoadedModel`)."""
    path = Path(path)
    config = read_config(path)
    args = check_against_weights(config, path)
    family = family_for(config)
    model = _build(config, args, path)
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
    tokenizer = _load_tokenizer(path, config)
    loaded = LoadedModel(path, config, model, tokenizer, mlps, low_memory=low_memory)
    # The non-FFN weights first: building the dense FFN while they are still lazy
    # keeps the whole bank alive beside its dense copy (857 MB live for SmolLM2's
    # 542 MB fp32 files, against 538 MB in this order).
    mx.eval(model.parameters())
    if dense:
        loaded.assign(loaded.dense_ffn())
    return loaded


def _build(config: dict, args: Any, path: Path) -> nn.Module:
    """mlx-lm's model for a checked config and its ``args``. The checks cover every
    field the families read; a combination they miss still fails here as one line."""
    model_class, _ = _get_classes(config)
    try:
        return model_class(args)
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"{path}: config.json does not build a {config['model_type']} model: {error_line(e)}") from None


def _load_tokenizer(path: Path, config: dict) -> TokenizerWrapper:
    """mlx-lm's tokenizer. transformers reads config.json again, with checks of its
    own for fields ifp never uses (``architectures``, ``hidden_act``, the exact type
    of each number); what it refuses is one line."""
    try:
        return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, StrictDataclassError) as e:
        raise ConfigError(f"{path}: transformers does not load this folder's tokenizer or config: {error_line(e)}") from None


def _load_weights(model: nn.Module, weights: dict, path: Path) -> None:
    """Every tensor but the MLPs' present with the shape the config builds (load_weights
    with strict=False checks no shapes), then load_weights."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters()) if ".mlp." not in k}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise IFPError(f"{path}: weights missing from {path.name}: {', '.join(missing[:3])}")
    extra = sorted(k for k in set(weights) - set(expected) if ".mlp." not in k)
    if extra:
        raise ConfigError(f"{path}: config.json builds no {extra[0]}, which the weights file has")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise ConfigError(
                f"{path}: config.json makes {name} {tuple(shape)}, the weights file has {tuple(weights[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)
