"""The predictor folder format and its scoring head (the part of a predictor that is saved).

A predictor folder holds ``config.json`` (backbone, head sizes and activation,
the target model's fingerprint, a default keep ratio) and
``predictor.safetensors`` (the head), plus ``backbone/`` when the backbone is a
separate model. A model folder may carry a default predictor in ``predictor/``.
The converter writes such folders from PyTorch checkpoints; ``ifp_mlx.select``
attaches a backbone and selects with them.
"""

import json
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import IFPError
from .config_check import MAX_PROBE, MAX_SIZES, Fields, parse_config, show_value
from .masks import model_fingerprint

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "predictor.safetensors"
BACKBONE_FOLDER = "backbone"
DEFAULT_FOLDER = "predictor"  # a model folder's default predictor
SHIPPED_FOLDER = "predictors"  # predictors shipped in the package, one folder per model
HEAD_HIDDEN = 128
DEFAULT_KEEP = 0.5
# Prompt tokens the predictor reads: a longer prompt is read as its first and
# last halves of this many (0: the whole prompt). Bounds the selection's cost
# (the backbone's N dense layers over the prompt) against a prefill that grows
# with the prompt: docs/PREDICTOR.md measures both sides of that trade.
DEFAULT_WINDOW = 256
LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default

ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": nn.gelu,  # exact (erf), like torch.nn.GELU()
    "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.1),
}
FEATURE_NORMS = ("none", "layer_norm")


class PredictorHead(nn.Module):
    """The scoring head ``d -> h -> L * d_ff``: features in, channel scores out.

    ``backbone`` is a plain attribute (attached by the selector, never saved), so
    ``parameters()`` are the head's only: a trainer decides separately whether
    the backbone learns too.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        d_ff: int,
        head_hidden: int = HEAD_HIDDEN,
        activation: str = "none",
        bias: tuple[bool, bool] = (True, True),
        feature_norm: str = "none",
        backbone: Optional[Any] = None,
        window: int = DEFAULT_WINDOW,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise IFPError(f"unknown predictor activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if feature_norm not in FEATURE_NORMS:
            raise IFPError(f"unknown feature_norm {feature_norm!r}: use one of {', '.join(FEATURE_NORMS)}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0 or window == 1:
            raise IFPError(f"bad predictor window {window!r}: use 0 (the whole prompt) or a number of tokens >= 2")
        self.num_layers, self.d_ff = num_layers, d_ff
        self.activation, self.feature_norm, self.window = activation, feature_norm, window
        self.proj = nn.Linear(hidden_size, head_hidden, bias=bias[0])
        self.out = nn.Linear(head_hidden, num_layers * d_ff, bias=bias[1])
        self.backbone = backbone

    @property
    def hidden_size(self) -> int:
        return self.proj.weight.shape[1]

    @property
    def head_hidden(self) -> int:
        return self.proj.weight.shape[0]

    @property
    def bias(self) -> tuple[bool, bool]:
        return ("bias" in self.proj, "bias" in self.out)

    def scores(self, features: mx.array) -> mx.array:
        """Channel scores ``[B, L, d_ff]`` (differentiable)."""
        x = features.astype(self.proj.weight.dtype)
        if self.feature_norm == "layer_norm":
            x = mx.fast.layer_norm(x, None, None, LAYER_NORM_EPS)
        x = self.out(ACTIVATIONS[self.activation](self.proj(x)))
        return x.reshape(x.shape[0], self.num_layers, self.d_ff)


def read_predictor_config(path: Path) -> dict:
    """A predictor folder's ``config.json``, every field checked (one line naming it)."""
    config_file = path / CONFIG_FILE
    if not path.is_dir() or not config_file.is_file():
        raise IFPError(f"{path} is not a predictor folder (no {CONFIG_FILE})")
    config = parse_config(config_file)
    missing = [key for key in ("target", "backbone", "hidden_size") if key not in config]
    if missing:
        raise IFPError(f"{path} is not a predictor folder (config.json has no {missing[0]})")
    if config.get("format_version") != FORMAT_VERSION:
        raise IFPError(f"{path}: predictor format_version {config.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    check_predictor_config(config, config_file)
    return config


def check_predictor_config(config: dict, where: Path) -> None:
    """The head's sizes and settings, the target's fingerprint and the adapter block.

    A predictor folder comes from anywhere, like a model folder: a string
    where a size belongs, a negative width or a null target would otherwise
    fail deep inside MLX with a traceback."""
    fields = Fields(config, where)
    if not isinstance(config["backbone"], str):
        raise fields.fail("backbone", f"is {show_value(config['backbone'])}: use shared:N or a folder name")
    fields.whole("hidden_size", 1, MAX_SIZES["hidden_size"])
    if "head_hidden" in config:
        fields.whole("head_hidden", 1, MAX_SIZES["hidden_size"])
    for name, allowed in (("activation", tuple(ACTIVATIONS)), ("feature_norm", FEATURE_NORMS)):
        if name in config:
            fields.choice(name, allowed)
    bias = config.get("bias", [True, True])
    if not (isinstance(bias, list) and len(bias) == 2 and all(isinstance(b, bool) for b in bias)):
        raise fields.fail("bias", f"is {show_value(bias)}: it must be two of true or false")
    if "window" in config:
        window = fields.whole("window", 0, MAX_SIZES["max_position_embeddings"])
        if window == 1:
            raise fields.fail("window", "is 1: use 0 (the whole prompt) or a number of tokens >= 2")
    target = Fields(fields.mapping("target", required=True), where, "target.")
    if not isinstance(target.config.get("model_type"), str):
        raise target.fail("model_type", f"is {show_value(target.config.get('model_type'))}: it must be a family name")
    for name, limit in (("num_layers", "num_hidden_layers"), ("d_ff", "intermediate_size"), ("hidden_size", "hidden_size")):
        target.whole(name, 1, MAX_SIZES[limit])
    target.numbers("probe", MAX_PROBE)
    adapter = Fields(fields.mapping("adapter"), where, "adapter.")
    if adapter.config:
        adapter.fraction("keep")
        scale = adapter.config.get("scale")
        if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < 1e6):
            raise adapter.fail("scale", f"is {show_value(scale)}: it must be a number above 0")


def load_head(predictor: PredictorHead, weights: dict[str, mx.array], path: Path) -> None:
    """Check names and shapes (one-line errors), then load the head in float32."""
    expected = dict(tree_flatten(predictor.parameters()))
    for name, value in expected.items():
        if name not in weights:
            raise IFPError(f"{path}: missing head weight {name}")
        if tuple(weights[name].shape) != tuple(value.shape):
            raise IFPError(f"{path}: head weight {name} has shape {tuple(weights[name].shape)}, expected {tuple(value.shape)}")
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise IFPError(f"{path}: unknown head weight {unknown[0]}")
    predictor.load_weights([(n, weights[n].astype(mx.float32)) for n in expected])
    mx.eval(predictor.parameters())


def predictor_config(predictor: PredictorHead, target_config: dict, keep: float, backbone: str, **extra) -> dict:
    """The ``config.json`` of a predictor folder."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "hidden_size": predictor.hidden_size,
        "head_hidden": predictor.head_hidden,
        "activation": predictor.activation,
        "bias": list(predictor.bias),
        "feature_norm": predictor.feature_norm,
        "window": predictor.window,
        "target": model_fingerprint(target_config),
        "keep": keep,
        "weights": WEIGHTS_FILE,
        **extra,
    }


def write_predictor_files(
    folder: Path, predictor: PredictorHead, target_config: dict, keep: float, backbone: str,
    dtype: Optional[mx.Dtype] = None, **extra,
) -> None:
    """Write ``config.json`` and the head weights into ``folder`` (no backbone)."""
    if not 0 < keep <= 1:
        raise IFPError(f"keep must be in (0, 1], got {keep}")
    weights = dict(tree_flatten(predictor.parameters()))
    if dtype is not None:
        weights = {n: w.astype(dtype) for n, w in weights.items()}
    mx.save_safetensors(str(folder / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    config = predictor_config(predictor, target_config, keep, backbone, **extra)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
