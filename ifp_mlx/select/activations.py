"""GRIFFIN's training-free selector: a dense prefill of the prompt scores the channels."""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..model.load import LoadedModel
from .base import DEFAULT_KEEP, PREFILL_STEP, Selection, resolve_k, top_k


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
        self.loaded.dense_pass()
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
    adapter = None  # LoRA weights applied to pruned submodels (a jointly trained predictor's)

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def default_k(self, d_ff: int) -> int:
        return resolve_k(d_ff, DEFAULT_KEEP)

    def select(self, tokens: list[int], k: int) -> Selection:
        cache = make_prompt_cache(self.loaded.model)
        scores = ActivationScores(self.loaded)
        scores.run(tokens, cache)
        return Selection(top_k(scores.sums, k), cache, len(tokens))
