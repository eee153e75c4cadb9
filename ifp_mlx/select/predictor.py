"""The IFPruning sparsity predictor: a backbone reads the prompt, a head scores channels.

Features are the backbone's final-norm hidden state at the last *real* token of
the prompt (found from the attention mask, never from a pad id). The head maps
them ``d -> h -> L * d_ff`` (h = 128 by default, activation none, gelu or
leaky_relu(0.1)); the scores come out layer-major and every layer keeps its
top-k channels.

Backbones:
- ``shared:N``: the target model's own embedding, first N layers (dense FFN)
  and final norm. No extra weights beyond a dense copy of N layers' FFN.
- a separate ifp model folder (the paper's small LM), loaded dense. When its
  vocabulary differs from the target's, the prompt is re-tokenized from text.

A predictor folder holds ``config.json`` (backbone, head sizes and activation,
the target model's fingerprint, a default keep ratio) and
``predictor.safetensors`` (the head), plus ``backbone/`` when the backbone is a
separate model. A model folder may carry a default predictor in ``predictor/``.

The shared backbone's dense KV cache of the first N layers is *not* handed to
the generation: the compact model's prefill recomputes the whole prompt. The
dense cache differs from what the pruned model computes for layers 1..N-1, and
the engine can only take a cache covering every layer (see docs/PREDICTOR.md).
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from ..errors import IFPError
from ..files import atomic_folder
from ..model.bank import Bank, CompactFFN, dense_ffn
from ..model.load import LoadedModel, load
from ..model.masks import check_fingerprint, model_fingerprint
from .base import PREFILL_STEP, Selection, resolve_k, top_k

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "predictor.safetensors"
BACKBONE_FOLDER = "backbone"
DEFAULT_FOLDER = "predictor"  # a model folder's default predictor
SHIPPED_FOLDER = "predictors"  # predictors shipped in the package, one folder per model
HEAD_HIDDEN = 128
DEFAULT_KEEP = 0.5
LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default

ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": nn.gelu,  # exact (erf), like torch.nn.GELU()
    "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.1),
}
FEATURE_NORMS = ("none", "layer_norm")


class Backbone:
    """Runs the prompt through a model and returns final-norm hidden states.

    ``layers`` limits the run to the first N layers (the shared backbone). The
    family's own ``model.model`` forward does the work, with its layer list cut
    to N for the call, so embedding scales and sliding-window masks stay the
    family's own.
    """

    def __init__(self, loaded: LoadedModel, layers: Optional[int] = None, shared: bool = False):
        self.loaded, self.layers, self.shared = loaded, layers, shared
        self.ffn: Optional[CompactFFN] = None  # dense FFN of the first N layers (shared)
        self._same_vocab: Optional[bool] = None

    @property
    def spec(self) -> str:
        return f"shared:{self.layers}" if self.shared else str(self.loaded.path)

    @property
    def hidden_size(self) -> int:
        return self.loaded.ifp["bank"]["hidden_size"]

    def prepare(self) -> None:
        """Shared: build the dense FFN of the first N layers once (from the bank)."""
        if not self.shared or self.ffn is not None:
            return
        if self.loaded.dense is not None:
            self.ffn = self.loaded.dense
            return
        bank, n = self.loaded.bank(), self.layers
        first = Bank(
            bank.weight[:n],
            None if bank.scales is None else bank.scales[:n],
            None if bank.biases is None else bank.biases[:n],
            bank.bits, bank.group_size,
        )
        self.ffn = dense_ffn(first)
        mx.eval(self.ffn.arrays())

    def encode(self, tokens: list[int], tokenizer) -> list[int]:
        """The prompt in the backbone's vocabulary (re-tokenized from text if it differs)."""
        if self.shared:
            return tokens
        if self._same_vocab is None:
            self._same_vocab = _same_ids(tokenizer.get_vocab(), self.loaded.tokenizer.get_vocab())
        if self._same_vocab:
            return tokens
        return self.loaded.tokenizer.encode(tokenizer.decode(tokens), add_special_tokens=False)

    def hidden(self, tokens: mx.array) -> mx.array:
        """Final-norm hidden states ``[B, T, d]`` of right-padded ``tokens [B, T]``.

        Shared: the first N layers are left on the dense FFN; the engine assigns
        its submodel after selecting, as it does after every selector.
        """
        body = self.loaded.model.model
        if self.shared:
            self.prepare()
            for mlp in self.loaded.mlps[: self.layers]:
                mlp.assign(self.ffn)
        caches = make_prompt_cache(self.loaded.model) if tokens.shape[1] > PREFILL_STEP else None
        with _first_layers(body, self.layers):
            if caches is None:
                return body(tokens, cache=[None] * self.loaded.num_layers)
            chunks = range(0, tokens.shape[1], PREFILL_STEP)
            return mx.concatenate([body(tokens[:, s : s + PREFILL_STEP], cache=caches) for s in chunks], axis=1)


def _same_ids(a: dict[str, int], b: dict[str, int]) -> bool:
    """Token ids mean the same strings wherever both vocabularies know them
    (loaders may add a special token or two to one side)."""
    return all(b.get(t, i) == i for t, i in a.items()) and all(a.get(t, i) == i for t, i in b.items())


@contextmanager
def _first_layers(body: nn.Module, n: Optional[int]) -> Iterator[None]:
    """Cut ``body.layers`` to its first n for the duration of a call."""
    if n is None:
        yield
        return
    layers = body.layers
    body.layers = layers[:n]
    try:
        yield
    finally:
        body.layers = layers


def open_backbone(spec: str, loaded: LoadedModel, base: Path) -> Backbone:
    """``shared:N`` or a model folder (relative to the predictor folder ``base``)."""
    if spec.startswith("shared:"):
        try:
            n = int(spec[len("shared:") :])
        except ValueError:
            raise IFPError(f"bad backbone {spec!r}: use shared:N with N a number of layers")
        if not 1 <= n <= loaded.num_layers:
            raise IFPError(f"backbone {spec}: N must be in 1..{loaded.num_layers} (the model's layers)")
        return Backbone(loaded, n, shared=True)
    path = Path(spec)
    path = path if path.is_absolute() else base / path
    if not path.is_dir():
        raise IFPError(f"{base}: predictor backbone folder {path.name} not found")
    return Backbone(load(path), shared=False)


def pad_batch(prompts: Sequence[Sequence[int]]) -> tuple[mx.array, mx.array]:
    """Right-pad token lists into ``tokens [B, T]`` and an attention ``mask [B, T]``."""
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return mx.array(tokens), mx.array(mask)


def _pack(tokens, mask) -> tuple[np.ndarray, np.ndarray]:
    """Real tokens moved to the front of each row (any padding side) and their counts.

    ``mask`` is an attention mask ``[B, T]`` (1 = real token) or lengths ``[B]``.
    With real tokens first, a causal model gives the last real token the same
    hidden state as the unpadded prompt, whatever the pad tokens are.
    """
    tokens = np.asarray(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    B, T = tokens.shape
    if mask is None:
        real = np.ones((B, T), bool)
    else:
        mask = np.asarray(mask)
        if mask.ndim == 1:
            real = np.arange(T)[None] < mask.reshape(B, 1)
        else:
            real = mask.reshape(B, T).astype(bool)
    lengths = real.sum(axis=1)
    if (lengths == 0).any():
        raise IFPError("a prompt has no real tokens (its attention mask is all zeros)")
    order = np.argsort(~real, axis=1, kind="stable")
    packed = np.take_along_axis(tokens, order, axis=1)[:, : lengths.max()]
    packed = np.where(np.arange(packed.shape[1])[None] < lengths[:, None], packed, 0)
    return packed.astype(np.int32), lengths


class Predictor(nn.Module):
    """The scoring head ``d -> h -> L * d_ff``; the backbone is attached, not owned.

    ``backbone`` is a plain attribute, so ``parameters()`` are the head's only:
    a trainer decides separately whether the backbone learns too.
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
        backbone: Optional[Backbone] = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise IFPError(f"unknown predictor activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if feature_norm not in FEATURE_NORMS:
            raise IFPError(f"unknown feature_norm {feature_norm!r}: use one of {', '.join(FEATURE_NORMS)}")
        self.num_layers, self.d_ff = num_layers, d_ff
        self.activation, self.feature_norm = activation, feature_norm
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

    def features(self, tokens, mask=None) -> mx.array:
        """Final-norm hidden state ``[B, d]`` of each prompt's last real token.

        ``tokens [B, T]`` are backbone token ids; ``mask`` is the attention mask
        ``[B, T]`` (left, right or any padding) or lengths ``[B]``; None: no padding.
        """
        if self.backbone is None:
            raise IFPError("this predictor has no backbone attached")
        packed, lengths = _pack(tokens, mask)
        hidden = self.backbone.hidden(mx.array(packed))
        rows = mx.arange(packed.shape[0])
        return hidden[rows, mx.array(lengths - 1)].astype(mx.float32)

    def scores(self, features: mx.array) -> mx.array:
        """Channel scores ``[B, L, d_ff]`` (differentiable)."""
        x = features.astype(self.proj.weight.dtype)
        if self.feature_norm == "layer_norm":
            x = mx.fast.layer_norm(x, None, None, LAYER_NORM_EPS)
        x = self.out(ACTIVATIONS[self.activation](self.proj(x)))
        return x.reshape(x.shape[0], self.num_layers, self.d_ff)

    def select(self, prompts: Sequence[Sequence[int]], k: int) -> mx.array:
        """Indices ``[B, L, k]`` (ascending per layer) for backbone-token prompts."""
        tokens, mask = pad_batch(prompts)
        return top_k(self.scores(self.features(tokens, mask)), k)


def create_predictor(
    loaded: LoadedModel,
    backbone: str = "shared:4",
    head_hidden: int = HEAD_HIDDEN,
    activation: str = "none",
    base: Path = Path("."),
) -> Predictor:
    """A freshly initialised predictor for ``loaded`` (training starts from here)."""
    attached = open_backbone(backbone, loaded, base)
    attached.prepare()
    return Predictor(attached.hidden_size, loaded.num_layers, loaded.d_ff, head_hidden, activation, backbone=attached)


class PredictorSelector:
    """IFPruning: the predictor's per-layer top-k for each prompt."""

    name = "predictor"
    needs_dense = False

    def __init__(self, loaded: LoadedModel, predictor: Predictor, keep: float = DEFAULT_KEEP):
        self.loaded, self.predictor, self.keep = loaded, predictor, keep

    @classmethod
    def for_model(cls, loaded: LoadedModel, path: Optional[str | Path] = None) -> "PredictorSelector":
        """The predictor at ``path``, the model folder's ``predictor/``, or one shipped for it."""
        if path is None:
            path = default_predictor(loaded)
            if path is None:
                raise IFPError(
                    f"{loaded.path} has no default predictor ({DEFAULT_FOLDER}/): pass --predictor DIR "
                    "(make one with `ifp convert-predictor`)"
                )
        predictor, config = load_predictor(path, loaded)
        return cls(loaded, predictor, config.get("keep", DEFAULT_KEEP))

    def default_k(self, d_ff: int) -> int:
        return resolve_k(d_ff, self.keep)

    def scores(self, tokens: list[int]) -> mx.array:
        """Scores ``[L, d_ff]`` of one prompt given in the target's tokens."""
        prompt = self.predictor.backbone.encode(tokens, self.loaded.tokenizer)
        return self.predictor.scores(self.predictor.features([prompt]))[0]

    def select(self, tokens: list[int], k: int) -> Selection:
        indices = top_k(self.scores(tokens), k)
        mx.eval(indices)
        return Selection(indices)


def default_predictor(loaded: LoadedModel) -> Optional[Path]:
    """The model folder's ``predictor/``, else a predictor shipped for the model, else None."""
    own = loaded.path / DEFAULT_FOLDER
    return own if own.is_dir() else shipped_predictor(loaded.config)


def has_predictor(loaded: LoadedModel) -> bool:
    """Whether ``--selector predictor`` works without ``--predictor`` for this model."""
    return default_predictor(loaded) is not None


def shipped_predictor(config: dict) -> Optional[Path]:
    """A predictor shipped in the package (``ifp_mlx/predictors/``) made for this model."""
    root = Path(__file__).parent.parent / SHIPPED_FOLDER
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            check_fingerprint(read_predictor_config(folder)["target"], config, "shipped predictor")
        except IFPError:
            continue
        return folder
    return None


def read_predictor_config(path: Path) -> dict:
    config_file = path / CONFIG_FILE
    if not path.is_dir() or not config_file.is_file():
        raise IFPError(f"{path} is not a predictor folder (no {CONFIG_FILE})")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IFPError(f"{config_file}: invalid JSON")
    missing = [key for key in ("target", "backbone", "hidden_size") if key not in config] if isinstance(config, dict) else ["target"]
    if missing:
        raise IFPError(f"{path} is not a predictor folder (config.json has no {missing[0]})")
    if config.get("format_version") != FORMAT_VERSION:
        raise IFPError(f"{path}: predictor format_version {config.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return config


def load_predictor(path: str | Path, loaded: LoadedModel) -> tuple[Predictor, dict]:
    """Load a predictor folder for ``loaded``; a predictor for another model is refused."""
    path = Path(path)
    config = read_predictor_config(path)
    check_fingerprint(config["target"], loaded.config, f"predictor {path}")
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise IFPError(f"{path}: {WEIGHTS_FILE} not found")
    try:
        weights = mx.load(str(weights_file))
    except (ValueError, RuntimeError):
        raise IFPError(f"{weights_file}: not a safetensors file")
    predictor = Predictor(
        config["hidden_size"], loaded.num_layers, loaded.d_ff, config.get("head_hidden", HEAD_HIDDEN),
        config.get("activation", "none"), tuple(config.get("bias", (True, True))), config.get("feature_norm", "none"),
    )
    _load_head(predictor, weights, weights_file)
    predictor.backbone = open_backbone(config["backbone"], loaded, path)
    if predictor.backbone.hidden_size != predictor.hidden_size:
        raise IFPError(
            f"{path}: the head reads {predictor.hidden_size} features, the backbone gives {predictor.backbone.hidden_size}"
        )
    predictor.backbone.prepare()
    return predictor, config


def _load_head(predictor: Predictor, weights: dict[str, mx.array], path: Path) -> None:
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


def predictor_config(predictor: Predictor, target_config: dict, keep: float, backbone: str, **extra) -> dict:
    """The ``config.json`` of a predictor folder."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "hidden_size": predictor.hidden_size,
        "head_hidden": predictor.head_hidden,
        "activation": predictor.activation,
        "bias": list(predictor.bias),
        "feature_norm": predictor.feature_norm,
        "target": model_fingerprint(target_config),
        "keep": keep,
        "weights": WEIGHTS_FILE,
        **extra,
    }


def write_predictor_files(
    folder: Path, predictor: Predictor, target_config: dict, keep: float, backbone: str,
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


def save_predictor(
    path: str | Path, predictor: Predictor, target_config: dict, keep: float = DEFAULT_KEEP, force: bool = False
) -> Path:
    """Write a predictor folder atomically.

    A separate backbone's model folder is copied into ``backbone/`` as it is on
    disk, so the folder stands alone (weights changed in memory are not saved).
    """
    backbone = predictor.backbone
    if backbone is None:
        raise IFPError("cannot save a predictor without a backbone")
    with atomic_folder(path, force) as tmp:
        spec = backbone.spec
        if not backbone.shared:
            shutil.copytree(backbone.loaded.path, tmp / BACKBONE_FOLDER)
            spec = BACKBONE_FOLDER
        write_predictor_files(tmp, predictor, target_config, keep, spec)
    return Path(path)
