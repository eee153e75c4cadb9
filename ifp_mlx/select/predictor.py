"""The IFPruning sparsity predictor: a backbone reads the prompt, a head scores channels.

Features are the backbone's final-norm hidden state at the last *real* token of
the prompt (found from the attention mask, never from a pad id). The head maps
them ``d -> h -> L * d_ff`` (h = 128 by default, activation none, gelu or
leaky_relu(0.1)); the scores come out layer-major and every layer keeps its
top-k channels.

Backbones:
- ``shared:N``: the target model's own embedding, first N layers (dense FFN)
  and final norm. No extra weights: the N layers' dense FFN is built from the
  bank (resident, or read from disk with ``--low-memory``) a layer at a time in
  each selection, never kept beside it.
- a separate ifp model folder (the paper's small LM), loaded dense. When its
  vocabulary differs from the target's, the prompt is re-tokenized from text.

A prompt longer than the predictor's window (256 tokens unless its folder says
otherwise) is read as its first and last halves, so the selection costs at most
N dense layers over that many tokens however long the prompt grows.

The folder format and the head live in ``ifp_mlx.model.predictor_head``.

The shared backbone's dense KV cache of the first N layers is *not* handed to
the generation: the compact model's prefill recomputes the whole prompt. The
dense cache differs from what the pruned model computes for layers 1..N-1, and
the engine can only take a cache covering every layer (see docs/PREDICTOR.md).
"""

import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..errors import IFPError
from ..files import atomic_folder
from ..model.adapter import ADAPTER_FILE, LORA_SCALE, Adapter, load_adapter, save_adapter
from ..model.load import LoadedModel, load
from ..model.masks import check_fingerprint
from ..model.predictor_head import (
    BACKBONE_FOLDER,
    DEFAULT_FOLDER,
    DEFAULT_KEEP,
    DEFAULT_WINDOW,
    HEAD_HIDDEN,
    SHIPPED_FOLDER,
    WEIGHTS_FILE,
    PredictorHead,
    load_head,
    read_predictor_config,
    write_predictor_files,
)
from .base import PREFILL_STEP, Selection, resolve_k, top_k


class Backbone:
    """Runs the prompt through a model and returns final-norm hidden states.

    ``layers`` limits the run to the first N layers (the shared backbone). The
    family's own ``model.model`` forward does the work, with its layer list cut
    to N for the call, so embedding scales and sliding-window masks stay the
    family's own.
    """

    def __init__(self, loaded: LoadedModel, layers: Optional[int] = None, shared: bool = False):
        self.loaded, self.layers, self.shared = loaded, layers, shared
        self._same_vocab: Optional[bool] = None

    @property
    def spec(self) -> str:
        return f"shared:{self.layers}" if self.shared else str(self.loaded.path)

    @property
    def hidden_size(self) -> int:
        return self.loaded.ifp["bank"]["hidden_size"]

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

        Shared: the first N layers compute every channel (the dense FFN when
        it is built, else from the bank a layer at a time) and are left so; the
        engine assigns its submodel after selecting, as it does after every selector.
        """
        body = self.loaded.model.model
        if self.shared:
            for mlp in self.loaded.mlps[: self.layers]:
                if self.loaded.dense is not None:
                    mlp.assign(self.loaded.dense)
                else:
                    mlp.assign_records(partial(self.loaded.dense_layer, mlp.layer))
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
        raise IFPError(f"predictor backbone folder {path.name} not found")
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


def _window(packed: np.ndarray, lengths: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each packed prompt longer than ``window`` cut to its first and last halves
    of it (0: no window), as long-context evaluations cut the middle: the
    instruction at either end stays in view."""
    if not window or lengths.max() <= window:
        return packed, lengths
    head, out = window // 2, np.zeros((len(packed), window), np.int32)
    for row, (tokens, n) in enumerate(zip(packed, lengths.tolist())):
        kept = tokens[:n] if n <= window else np.concatenate([tokens[:head], tokens[n - (window - head) : n]])
        out[row, : len(kept)] = kept
    return out, np.minimum(lengths, window)


class Predictor(PredictorHead):
    """The head with a backbone attached: prompts in, per-layer top-k out."""

    def features(self, tokens, mask=None) -> mx.array:
        """Final-norm hidden state ``[B, d]`` of each prompt's last real token.

        ``tokens [B, T]`` are backbone token ids; ``mask`` is the attention mask
        ``[B, T]`` (left, right or any padding) or lengths ``[B]``; None: no padding.
        """
        if self.backbone is None:
            raise IFPError("this predictor has no backbone attached")
        packed, lengths = _window(*_pack(tokens, mask), self.window)
        hidden = self.backbone.hidden(mx.array(packed))
        rows = mx.arange(packed.shape[0])
        return hidden[rows, mx.array(lengths - 1)].astype(mx.float32)

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
    return Predictor(attached.hidden_size, loaded.num_layers, loaded.d_ff, head_hidden, activation, backbone=attached)


class PredictorSelector:
    """IFPruning: the predictor's per-layer top-k for each prompt."""

    name = "predictor"
    needs_dense = False
    adapter = None  # LoRA weights applied to pruned submodels (a jointly trained predictor's)

    def __init__(self, loaded: LoadedModel, predictor: Predictor, keep: float = DEFAULT_KEEP, adapter: Optional[Adapter] = None):
        self.loaded, self.predictor, self.keep, self.adapter = loaded, predictor, keep, adapter

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
        return cls(loaded, predictor, config.get("keep", DEFAULT_KEEP), load_adapter(Path(path), config))

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
        window=config.get("window", DEFAULT_WINDOW),
    )
    load_head(predictor, weights, weights_file)
    try:
        predictor.backbone = open_backbone(config["backbone"], loaded, path)
    except IFPError as e:
        raise IFPError(f"{path}: {e}") from None
    if predictor.backbone.hidden_size != predictor.hidden_size:
        raise IFPError(
            f"{path}: the head reads {predictor.hidden_size} features, the backbone gives {predictor.backbone.hidden_size}"
        )
    return predictor, config


def save_predictor(
    path: str | Path, predictor: Predictor, target_config: dict, keep: float = DEFAULT_KEEP, force: bool = False,
    adapted: Optional[nn.Module] = None,
) -> Path:
    """Write a predictor folder atomically.

    A separate backbone's model folder is copied into ``backbone/`` as it is on
    disk, so the folder stands alone (weights changed in memory are not saved).
    ``adapted``: a model trained with LoRA adapters, saved beside the head.
    """
    backbone = predictor.backbone
    if backbone is None:
        raise IFPError("cannot save a predictor without a backbone")
    with atomic_folder(path, force) as tmp:
        spec = backbone.spec
        if not backbone.shared:
            shutil.copytree(backbone.loaded.path, tmp / BACKBONE_FOLDER)
            spec = BACKBONE_FOLDER
        extra = {}
        if adapted is not None:
            save_adapter(tmp, adapted)
            extra["adapter"] = {"file": ADAPTER_FILE, "scale": LORA_SCALE, "keep": keep}
        write_predictor_files(tmp, predictor, target_config, keep, spec, **extra)
    return Path(path)
