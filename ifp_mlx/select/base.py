"""What every selector shares: the Selection it returns, its interface, top-k and sizes.

A selector picks, for a prompt, which k FFN channels of every layer the reply
keeps. Its Selection's ``indices`` are ``[L, k]`` uint32, ascending within a
layer (``None`` for the dense model). A selector that runs the prompt through
the dense model (``activations``) also hands over the KV cache it filled, so the
prompt is not processed twice.
"""

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import mlx.core as mx
import numpy as np

from ..errors import IFPError
from ..model.adapter import Adapter
# DEFAULT_KEEP: what a selector keeps when neither it nor the user says, the same
# default as a predictor folder that names no keep of its own.
from ..model.predictor_head import DEFAULT_KEEP  # noqa: F401

PREFILL_STEP = 512  # tokens per forward pass when a prompt is run in chunks


@dataclass
class Selection:
    indices: Optional[mx.array]  # [L, k] uint32, or None for every channel
    prompt_cache: Optional[list] = None  # KV cache of the prompt, from a dense pass
    cached_tokens: int = 0  # prompt tokens already in prompt_cache

    @property
    def key(self) -> Optional[bytes]:
        """Identifies the submodel: equal indices share one gathered FFN."""
        return None if self.indices is None else np.array(self.indices).tobytes()


@runtime_checkable
class Selector(Protocol):
    """The one interface every selector implements (the engine, the CLI, eval and
    bench see nothing else).

    ``name``: what ``--selector`` calls it. ``needs_dense``: whether selecting
    runs the dense model over the prompt (so the dense FFN must be at hand).
    ``default_k(d_ff)``: the channels per layer it keeps when the user names no
    size (a mask file its own k, a predictor the keep it was trained for).
    ``adapter``: LoRA weights the engine applies while a pruned submodel of this
    selector's runs (``ifp_mlx.model.adapter``), or None.
    """

    name: str
    needs_dense: bool
    adapter: Optional[Adapter]

    def select(self, tokens: list[int], k: int) -> Selection: ...

    def default_k(self, d_ff: int) -> int: ...


def round_k(k: int, d_ff: int) -> int:
    """Round k up to a multiple of 8, capped at d_ff.

    Metal's fast quantized mat-vec wants the output size N % 8 == 0, and the
    compact ``gate_up`` has N = 2k, ``down_t`` is used with K = k. A cap at
    d_ff keeps k a valid selection size (the dense model).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if d_ff < 1:
        raise ValueError(f"d_ff must be at least 1, got {d_ff}")
    return min(-(-k // 8) * 8, d_ff)


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


def top_k(scores: mx.array, k: int) -> mx.array:
    """Per-layer indices of the k largest scores, ascending."""
    if k >= scores.shape[-1]:
        return mx.broadcast_to(mx.arange(scores.shape[-1], dtype=mx.uint32), scores.shape)
    picked = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    return mx.sort(picked, axis=-1).astype(mx.uint32)
