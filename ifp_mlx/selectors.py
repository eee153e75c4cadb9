"""Selectors: which k FFN channels of every layer a prompt keeps.

Every selector returns a Selection whose ``indices`` are ``[L, k]`` uint32,
ascending within a layer (``None`` for the dense model). A selector that runs
the prompt through the dense model (``activations``) also hands over the KV
cache it filled, so the prompt is not processed twice.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .errors import IFPError
from .gather import round_k
from .load import LoadedModel
from .masks import load_mask

SELECTORS = ("activations", "static", "dense", "random", "predictor")
PREFILL_STEP = 512


@dataclass
class Selection:
    indices: Optional[mx.array]  # [L, k] uint32, or None for every channel
    prompt_cache: Optional[list] = None  # KV cache of the prompt, from a dense pass
    cached_tokens: int = 0  # prompt tokens already in prompt_cache

    @property
    def key(self) -> Optional[bytes]:
        """Identifies the submodel: equal indices share one gathered FFN."""
        return None if self.indices is None else np.array(self.indices).tobytes()


def resolve_k(d_ff: int, keep: Optional[float] = None, k: Optional[int] = None) -> int:
    """Channels per layer from ``--keep`` or ``--k``, rounded up to a multiple of 8."""
    if keep is not None and k is not None:
        raise IFPError("give --keep or --k, not both")
    if k is not None:
        if not 0 < k <= d_ff:
            raise IFPError(f"--k must be in 1..{d_ff} (the model's FFN width), got {k}")
        return round_k(k, d_ff)
    if keep is None:
        return d_ff
    if not 0 < keep <= 1:
        raise IFPError(f"--keep must be in (0, 1], got {keep}")
    return round_k(max(1, int(round(keep * d_ff))), d_ff)


def default_size(selector, keep: Optional[float], k: Optional[int]) -> tuple[Optional[float], Optional[int]]:
    """``--keep``/``--k`` as given, else a mask file's own k, a predictor's keep, or half."""
    if keep is not None or k is not None:
        return keep, k
    if getattr(selector, "indices", None) is not None:
        return None, selector.indices.shape[1]
    return getattr(selector, "keep", 0.5), None


def top_k(scores: mx.array, k: int) -> mx.array:
    """Per-layer indices of the k largest scores, ascending."""
    if k >= scores.shape[-1]:
        return mx.broadcast_to(mx.arange(scores.shape[-1], dtype=mx.uint32), scores.shape)
    picked = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    return mx.sort(picked, axis=-1).astype(mx.uint32)


class ActivationScores:
    """GRIFFIN's statistic, accumulated while the dense model runs.

    Per layer, each token's activation row Z = act(gate(x)) * up(x) is
    L2-normalised over channels; a channel's score is the L2 norm of its column
    over tokens. Squared sums are kept, so scores add up over many texts
    (calibration) and the square root never changes a top-k.
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.sums = mx.zeros((loaded.num_layers, loaded.d_ff), dtype=mx.float32)
        self.tokens = 0
        self._skip = 0  # leading positions of the current chunk not to count

    def _observe(self, layer: int, hidden: mx.array) -> None:
        z = hidden[:, self._skip :].astype(mx.float32).reshape(-1, hidden.shape[-1])
        z = z / mx.maximum(mx.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
        self.sums[layer] = self.sums[layer] + (z * z).sum(axis=0)

    def run(self, tokens: list[int], cache: Optional[list] = None, skip: int = 0) -> None:
        """Run the dense model over ``tokens`` (chunked), accumulating scores.

        The first ``skip`` positions are context only: they are run, not
        counted (the oracle scores a reply given its prompt).
        """
        if cache is None and skip:
            cache = make_prompt_cache(self.loaded.model)
        self.loaded.assign(self.loaded.dense_ffn())
        for mlp in self.loaded.mlps:
            mlp.observer = self._observe
        try:
            for start in range(0, len(tokens), PREFILL_STEP):
                chunk = mx.array(tokens[start : start + PREFILL_STEP])[None]
                self._skip = min(max(0, skip - start), chunk.shape[1])
                self.loaded.model(chunk, cache=cache)
                mx.eval(self.sums, [c.state for c in cache] if cache else [])
        finally:
            for mlp in self.loaded.mlps:
                mlp.observer = None
            self._skip = 0
        self.tokens += len(tokens) - min(skip, len(tokens))


class ActivationSelector:
    """Training-free (GRIFFIN): a dense prefill of the prompt scores the channels."""

    name = "activations"
    needs_dense = True

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def select(self, tokens: list[int], k: int) -> Selection:
        cache = make_prompt_cache(self.loaded.model)
        scores = ActivationScores(self.loaded)
        scores.run(tokens, cache)
        return Selection(top_k(scores.sums, k), cache, len(tokens))


class StaticSelector:
    """One mask for every prompt: a mask file, or weight norms without one."""

    name = "static"
    needs_dense = False

    def __init__(self, loaded: LoadedModel, mask_path: Optional[str] = None):
        self.loaded = loaded
        self.indices = load_mask(mask_path, loaded.config)[0] if mask_path else None
        self.scores: Optional[mx.array] = None

    def select(self, tokens: list[int], k: int) -> Selection:
        if self.indices is None:
            if self.scores is None:
                self.scores = weight_norm_scores(self.loaded)
                mx.eval(self.scores)
            return Selection(top_k(self.scores, k))
        if self.indices.shape[1] != k:
            raise IFPError(f"the mask keeps {self.indices.shape[1]} channels per layer, but k is {k}: drop --keep/--k")
        return Selection(self.indices)


def weight_norm_scores(loaded: LoadedModel) -> mx.array:
    """|gate row| * |up row| per channel: a data-free (and weak) static score."""
    bank = loaded.bank()
    records = bank.weight
    if bank.quantized:
        records = mx.dequantize(bank.weight, bank.scales, bank.biases, group_size=bank.group_size, bits=bank.bits)
    norms = mx.linalg.norm(records[:, :, :2].astype(mx.float32), axis=-1)
    return norms[..., 0] * norms[..., 1]


class DenseSelector:
    """Every channel: the unpruned model, nothing gathered."""

    name = "dense"
    needs_dense = True

    def select(self, tokens: list[int], k: int) -> Selection:
        return Selection(None)


class RandomSelector:
    """k random channels per layer, seeded: the floor for evaluations."""

    name = "random"
    needs_dense = False

    def __init__(self, loaded: LoadedModel, seed: int = 0):
        self.loaded, self.seed = loaded, seed

    def select(self, tokens: list[int], k: int) -> Selection:
        rng = np.random.default_rng(self.seed)
        L, d_ff = self.loaded.num_layers, self.loaded.d_ff
        picked = np.sort(np.stack([rng.choice(d_ff, size=k, replace=False) for _ in range(L)]), axis=-1)
        return Selection(mx.array(picked.astype(np.uint32)))


def default_selector(loaded: LoadedModel, mask=None, predictor=None) -> str:
    """The selector for pruning when none is named: a mask file's, else the trained
    predictor when the model has one (it beats the others and needs no dense
    prefill, see docs/PRUNING.md), else the activation statistic."""
    from .predictor import has_predictor

    if mask is not None:
        return "static"
    return "predictor" if predictor is not None or has_predictor(loaded) else "activations"


def make_selector(name: str, loaded: LoadedModel, mask: Optional[str] = None, seed: int = 0, **kwargs):
    """Build a selector by name (the CLI's ``--selector``)."""
    factories: dict[str, Callable] = {
        "activations": lambda: ActivationSelector(loaded),
        "static": lambda: StaticSelector(loaded, mask),
        "dense": lambda: DenseSelector(),
        "random": lambda: RandomSelector(loaded, seed),
    }
    if name == "predictor":
        from .predictor import PredictorSelector

        return PredictorSelector.for_model(loaded, kwargs.get("predictor"))
    if name not in factories:
        raise IFPError(f"unknown selector {name!r}: choose one of {', '.join(SELECTORS)}")
    return factories[name]()
