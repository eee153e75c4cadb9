"""The two reference selectors: every channel (dense) and random channels (a floor)."""

import mlx.core as mx
import numpy as np

from ..model.load import LoadedModel
from .base import DEFAULT_KEEP, Selection, resolve_k


class DenseSelector:
    """Every channel: the unpruned model, nothing gathered."""

    name = "dense"
    needs_dense = True
    adapter = None  # LoRA weights applied to pruned submodels (a jointly trained predictor's)

    def default_k(self, d_ff: int) -> int:
        return d_ff

    def select(self, tokens: list[int], k: int) -> Selection:
        return Selection(None)


class RandomSelector:
    """k random channels per layer, seeded: the floor for evaluations."""

    name = "random"
    needs_dense = False
    adapter = None  # LoRA weights applied to pruned submodels (a jointly trained predictor's)

    def __init__(self, loaded: LoadedModel, seed: int = 0):
        self.loaded, self.seed = loaded, seed

    def default_k(self, d_ff: int) -> int:
        return resolve_k(d_ff, DEFAULT_KEEP)

    def select(self, tokens: list[int], k: int) -> Selection:
        rng = np.random.default_rng(self.seed)
        L, d_ff = self.loaded.num_layers, self.loaded.d_ff
        picked = np.sort(np.stack([rng.choice(d_ff, size=k, replace=False) for _ in range(L)]), axis=-1)
        return Selection(mx.array(picked.astype(np.uint32)))
