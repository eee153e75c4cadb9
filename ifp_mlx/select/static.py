"""The static selector: one mask for every prompt."""

from typing import Optional

import mlx.core as mx

from ..errors import IFPError
from ..model.load import LoadedModel
from ..model.masks import load_mask
from .base import DEFAULT_KEEP, Selection, resolve_k, top_k
from .calibrate import builtin_scores


class StaticSelector:
    """One mask for every prompt: a mask file's, or the top-k of activation
    scores calibrated on the built-in text (computed once per model, cached)."""

    name = "static"
    needs_dense = False
    adapter = None  # LoRA weights applied to pruned submodels (a jointly trained predictor's)

    def __init__(self, loaded: LoadedModel, mask_path: Optional[str] = None):
        self.loaded = loaded
        self.indices = load_mask(mask_path, loaded.config)[0] if mask_path else None
        self.scores: Optional[mx.array] = None

    def default_k(self, d_ff: int) -> int:
        return resolve_k(d_ff, DEFAULT_KEEP) if self.indices is None else self.indices.shape[1]

    def select(self, tokens: list[int], k: int) -> Selection:
        if self.indices is None:
            if self.scores is None:
                self.scores = builtin_scores(self.loaded)
                mx.eval(self.scores)
            return Selection(top_k(self.scores, k))
        if self.indices.shape[1] != k:
            raise IFPError(f"the mask keeps {self.indices.shape[1]} channels per layer, but k is {k}: drop --keep/--k")
        return Selection(self.indices)
