"""LoRA adapters on the attention of the masked LLM, through mlx-lm's own tuner.

mlx-lm's layers are used rather than our own so that there is one LoRA in the
stack: ``linear_to_lora_layers`` picks the linears by their key inside a block
and wraps plain and quantized ones alike, ``LoRALinear`` starts with ``B = 0``
(a fresh adapter leaves every output unchanged), and ``LoRALinear.fuse`` folds
``scale * A @ B`` back into the weight (re-quantizing a quantized base). The
checkpoint names are mlx-lm's too (``...self_attn.q_proj.lora_a`` / ``lora_b``).

Kept of our own: adapters only in the blocks from ``first_layer`` on (those
after a shared backbone, so the predictor's features stay fixed), the
update's scale, ``LORA_SCALE``, and the FFN's adapters (``add_ffn_lora``): the
compact FFN has no linear for mlx-lm to wrap, so its updates are
``ifp_mlx.model.ffn.LowRank`` modules, initialised as mlx-lm initialises
``LoRALinear`` (``A`` uniform in +-1/sqrt(inputs), ``B = 0``).
"""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..errors import IFPError
from ..model.adapter import LORA_SCALE
from ..model.ffn import CompactMLP, LowRank

# The attention linears that get adapters, as named inside one transformer block.
ATTENTION_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LORA_DROPOUT = 0.0  # a predictor run is a few hundred steps: nothing to regularise away
LORA_TARGETS = ("attention", "ffn", "all")  # what --lora-on adapts


def add_lora(model: nn.Module, first_layer: int, rank: int, on: str = "attention") -> None:
    """Freeze ``model``, then give blocks ``first_layer..L-1`` rank-``rank`` adapters,
    the only trainable parameters left: on the attention projections, on the
    FFN (``on="ffn"``) or both (``"all"``)."""
    num_layers = len(model.layers) - first_layer
    if num_layers <= 0:  # mlx-lm would read 0 as "every block" (layers[-0:])
        raise IFPError(f"--train-llm lora: no layer after the first {first_layer} of {len(model.layers)} to adapt")
    if on not in LORA_TARGETS:
        raise IFPError(f"unknown --lora-on {on!r}: use one of {', '.join(LORA_TARGETS)}")
    model.freeze()
    if on in ("attention", "all"):
        config = {"rank": rank, "scale": LORA_SCALE, "dropout": LORA_DROPOUT, "keys": ATTENTION_KEYS}
        linear_to_lora_layers(model, num_layers, config)
    if on in ("ffn", "all"):
        for block in model.layers[first_layer:]:
            add_ffn_lora(block.mlp, rank)


def add_ffn_lora(mlp: CompactMLP, rank: int) -> None:
    """Full-width LoRA updates beside a layer's gate_up and down matmuls (trained
    through the masked model; a submodel uses its channels' slice of them)."""
    d_ff, hidden = mlp.width, mlp.hidden_size
    mlp.gate_up_lora = LowRank(_lora_a(hidden, rank), mx.zeros((rank, 2 * d_ff)), LORA_SCALE)
    mlp.down_lora = LowRank(_lora_a(d_ff, rank), mx.zeros((rank, hidden)), LORA_SCALE)


def _lora_a(inputs: int, rank: int) -> mx.array:
    bound = 1 / math.sqrt(inputs)
    return mx.random.uniform(-bound, bound, (inputs, rank))


def merge_lora(model: nn.Module) -> None:
    """Replace every adapted linear in ``model`` by its fused plain linear, in place,
    frozen like the rest of the LLM (``fuse`` returns a new, trainable layer)."""
    fused = [(name, m.fuse().freeze()) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
