"""The static selector: one mask for every prompt."""

from typing import Optional

import mlx.core as mx

from ..errors import IFPError
from ..model.load import LoadedModel
from ..model.masks import load_mask
from .base import DEFAULT_KEEP, Selection, resolve_k, top_k


class StaticSelector:
    """One mask for every prompt: a mask file, or weight norms without one."""

    name = "static"
    needs_dense = False

    def __init__(self, loaded: LoadedModel, mask_path: Optional[str] = None):
        self.loaded = loaded
        self.indices = load_mask(mask_path, loaded.config)[0] if mask_path else None
        self.scores: Optional[mx.array] = None

    def default_k(self, d_ff: int) -> int:
        return resolve_k(d_ff, DEFAULT_KEEP) if self.indices is None else self.indices.shape[1]

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
