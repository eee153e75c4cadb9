"""Bytes one decode step reads, and the ideal speed-up a smaller FFN promises.

Decoding one token is bound by memory bandwidth: every weight it multiplies is
read once. So the best a pruned submodel can do is the ratio of the bytes the
dense model reads per token to the bytes the submodel reads. Per token, both
read the same non-FFN weights: the attention projections and norms, the output
layer, and the embedding table only when it is the output layer too (a lookup
reads one row). The FFN part is the whole bank for the dense model and k/d_ff
of it for a submodel of k channels per layer. The KV cache, which both read as
well, is left out: it is small next to the weights at these prompt lengths.
"""

from dataclasses import dataclass

from mlx.utils import tree_flatten

from ..model.load import LoadedModel


@dataclass(frozen=True)
class Traffic:
    """Bytes read per decoded token, split into the parts pruning does and does not touch."""

    non_ffn: int
    ffn_dense: int
    d_ff: int

    def ffn(self, k: int) -> int:
        return self.ffn_dense * k // self.d_ff

    def per_token(self, k: int) -> int:
        return self.non_ffn + self.ffn(k)

    def ideal_speedup(self, k: int) -> float:
        """Decode speed-up of a k-channel submodel over dense if only bytes mattered."""
        return self.per_token(self.d_ff) / self.per_token(k)


def non_ffn_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes of the non-FFN weights a decode step reads (see the module docstring)."""
    weights = {k: v for k, v in tree_flatten(loaded.model.parameters()) if ".mlp." not in k}
    total = sum(v.nbytes for v in weights.values())
    if any(k.startswith("lm_head.") for k in weights):
        total -= sum(v.nbytes for k, v in weights.items() if ".embed_tokens." in k)
    return total


def traffic(loaded: LoadedModel) -> Traffic:
    return Traffic(non_ffn_bytes_per_token(loaded), loaded.bank_file().nbytes, loaded.d_ff)
