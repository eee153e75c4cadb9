"""llama.cpp's names, layouts and hyper-parameters in Hugging Face terms.

The converter downstream only understands Hugging Face checkpoints, and the
gguf package only reads the container, so this module holds what llama.cpp
does differently: its own tensor names, Q/K rows permuted for its rotary
layout (llama), RMSNorm weights stored as ``w + 1`` (gemma), and
hyper-parameters it hard-codes or keeps elsewhere (Gemma 3's sliding-window
pattern, Llama 3's RoPE scaling stored only as a frequency tensor).

gguf-py's ``TensorNameMap`` goes the other way, from many checkpoint naming
schemes to GGUF's. Reversing it is ambiguous (several Hugging Face names map
to one GGUF name, and which one is right depends on the family: Gemma 3's
``ffn_norm`` is ``pre_feedforward_layernorm``), so the reverse tables for the
supported families are kept here.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .errors import ConversionError
from .gguf_meta import Metadata
from .tensors import SourceTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

Tensors = dict[str, SourceTensor]
Extras = dict[str, Callable[[], np.ndarray]]  # non-weight tensors, e.g. rope_freqs

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 3 wraps both sublayers in norms: GGUF's ffn_norm is the pre-FFN one.
_GEMMA3_NAMES = {
    **_BLOCK_NAMES,
    **_QK_NORM_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_BLOCK_NAMES = {
    "llama": _BLOCK_NAMES,
    "qwen2": _BLOCK_NAMES,
    "qwen3": {**_BLOCK_NAMES, **_QK_NORM_NAMES},
    "gemma3": _GEMMA3_NAMES,
}
# Tensors llama.cpp adds that are not weights: folded into the config instead.
NOT_WEIGHTS = {"rope_freqs.weight"}


def _layer_index(text: str) -> bool:
    """ASCII digits without leading zeros, so two GGUF names never meet in one HF name."""
    return text.isascii() and text.isdigit() and str(int(text)) == text


def hf_name(arch: str, gguf_name: str) -> str:
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise ConversionError(f"unexpected tensor {gguf_name} in a {arch} GGUF")
    parts = stem.split(".")
    if len(parts) == 1 and stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and _layer_index(parts[1]):
        hf = _ARCH_BLOCK_NAMES[arch].get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}.{suffix}"
    raise ConversionError(f"unexpected tensor {gguf_name} in a {arch} GGUF")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K weight (or bias).

    llama.cpp interleaves each head's two rotary halves; HF keeps them as
    halves. Without this the model's attention is scrambled and it emits
    nothing sensible.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def fixer(
    arch: str, gguf_name: str, shape: tuple[int, ...], meta: ArchMeta
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The layout fix a tensor needs after dequantization, if any."""
    kind = gguf_name.rsplit(".", 2)[-2] if gguf_name.count(".") >= 2 else ""
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        # llama.cpp permutes K with the KV head count, Q with the query head count.
        n_head = meta.heads if kind == "attn_q" else meta.kv_heads
        rows = shape[0] if shape else 1
        if rows % (2 * n_head):
            raise ConversionError(
                f"tensor {gguf_name} has {rows} rows, which do not split into {n_head} rotary heads"
            )
        return lambda w: _unpermute(w, n_head)
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        # llama.cpp bakes Gemma's (1 + w) into the stored weight; HF and mlx-lm add the 1.
        return lambda w: w - np.float32(1.0)
    return None


class ArchMeta(Metadata):
    """`{arch}.*` hyper-parameters, with the head counts every family needs."""

    def __init__(self, metadata: dict[str, Any], arch: str):
        super().__init__(metadata, f"{arch}.")
        self.arch = arch
        self.heads = self.integer("attention.head_count", minimum=1)
        self.kv_heads = self.integer("attention.head_count_kv", self.heads, minimum=1)


def _layer_count(meta: ArchMeta, tensors: Tensors) -> int:
    """block_count, checked against the layers the file holds (it also sizes per-layer lists)."""
    n = meta.integer("block_count", minimum=1)
    layers = {int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")}
    if len(layers) != n or max(layers, default=-1) != n - 1:  # distinct: so they are 0..n-1
        raise ConversionError(
            f"{meta.key('block_count')} is {n}, but the file has tensors for {len(layers)} layers"
            f" (numbered up to {max(layers, default=-1)})"
        )
    return n


def _base_config(meta: ArchMeta, tensors: Tensors) -> dict[str, Any]:
    hidden = meta.integer("embedding_length", minimum=1)
    head_dim = meta.integer("attention.key_length", hidden // meta.heads, minimum=1)
    return {
        "hidden_size": hidden,
        "intermediate_size": meta.integer("feed_forward_length", minimum=1),
        "num_hidden_layers": _layer_count(meta, tensors),
        "num_attention_heads": meta.heads,
        "num_key_value_heads": meta.kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.number("rope.freq_base", 10000.0),
        # The embedding is the truth: the vocab_size key is optional and can disagree.
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "max_position_embeddings": meta.integer("context_length", 4096, minimum=1),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "torch_dtype": "float32",  # what read() returns; the converter picks the output dtype
    }


def _rope_scaling(meta: ArchMeta) -> dict[str, Any] | None:
    kind = meta.get("rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    factor = meta.number("rope.scaling.factor", 1.0)
    if kind == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": meta.integer("rope.scaling.original_context_length"),
        }
    raise ConversionError(f"RoPE scaling type {meta.text('rope.scaling.type')!r} in this GGUF is not supported")


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recover Llama 3.x rope_scaling from the rope_freqs tensor llama.cpp stores.

    The GGUF keeps only the per-frequency factors, so try Meta's published
    parameters with the largest factor and accept them only if they reproduce
    every stored value.
    """
    if factors.shape != (head_dim // 2,) or head_dim % 2:
        raise ConversionError(f"this GGUF's rope_freqs has shape {factors.shape}, not ({head_dim // 2},)")
    factor, low, high, old = float(factors.max()), 1.0, 4.0, 8192
    with np.errstate(all="ignore"):  # a hostile theta or factor only fails the comparison
        freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        expected = np.where(
            wavelen < old / high,
            1.0,
            np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)),
        )
        matches = bool(np.allclose(expected, factors, rtol=1e-4))
    if not matches:
        raise ConversionError("this GGUF's rope_freqs do not match Llama 3 RoPE scaling")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old,
    }


def _config_llama(meta: ArchMeta, tensors: Tensors, raw: Extras) -> dict[str, Any]:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
    cfg.update(_base_config(meta, tensors))
    if "attention.key_length" not in meta:
        # Older llama files state the head size only as the rotary dimension.
        cfg["head_dim"] = meta.integer("rope.dimension_count", cfg["head_dim"], minimum=1)
    cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
    cfg["mlp_bias"] = False
    cfg["rope_scaling"] = _rope_scaling(meta)
    if "rope_freqs.weight" in raw:
        cfg["rope_scaling"] = _llama3_rope_scaling(raw["rope_freqs.weight"](), cfg["head_dim"], cfg["rope_theta"])
    return cfg


def _config_qwen2(meta: ArchMeta, tensors: Tensors, raw: Extras) -> dict[str, Any]:
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu"}
    cfg.update(_base_config(meta, tensors))
    cfg["rope_scaling"] = _rope_scaling(meta)
    cfg["use_sliding_window"] = False
    return cfg


def _config_qwen3(meta: ArchMeta, tensors: Tensors, raw: Extras) -> dict[str, Any]:
    cfg = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu"}
    cfg.update(_base_config(meta, tensors))
    cfg["rope_scaling"] = _rope_scaling(meta)
    cfg["attention_bias"] = False
    return cfg


def _swa_pattern(meta: ArchMeta) -> int:
    """llama.cpp hard-codes 6 for Gemma 3; newer files may store it, even per layer."""
    value = meta.get("attention.sliding_window_pattern", 6)
    if not isinstance(value, list):
        return meta.integer("attention.sliding_window_pattern", 6, minimum=1)
    if not all(isinstance(v, (bool, int)) for v in value):
        raise ConversionError(f"{meta.key('attention.sliding_window_pattern')} is not a list of flags")
    # Per-layer flags (True = sliding): the period ends at the first global layer.
    period = value.index(False) + 1 if False in value else len(value) + 1
    if any(bool(v) != bool((i + 1) % period) for i, v in enumerate(value)):
        raise ConversionError("gemma3 sliding-window layer pattern is not periodic")
    return period


def _config_gemma3(meta: ArchMeta, tensors: Tensors, raw: Extras) -> dict[str, Any]:
    cfg = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
    }
    cfg.update(_base_config(meta, tensors))
    cfg["rope_theta"] = meta.number("rope.freq_base", 1_000_000.0)
    # llama.cpp scales queries by 1/sqrt(head_dim), except 27B (62 layers): 1/sqrt(d/heads).
    scalar = cfg["head_dim"]
    if cfg["num_hidden_layers"] == 62:
        scalar = cfg["hidden_size"] // cfg["num_attention_heads"]
    pattern = _swa_pattern(meta)
    cfg.update(
        query_pre_attn_scalar=scalar,
        rope_local_base_freq=meta.number("rope.freq_base_swa", 10_000.0),
        sliding_window=meta.integer("attention.sliding_window", 512, minimum=1),
        sliding_window_pattern=pattern,
        layer_types=[
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg["num_hidden_layers"])
        ],
        rope_scaling=_rope_scaling(meta),
        final_logit_softcapping=meta.number("final_logit_softcapping", None),
        attn_logit_softcapping=None,
    )
    return cfg


CONFIGS = {
    "llama": _config_llama,
    "qwen2": _config_qwen2,
    "qwen3": _config_qwen3,
    "gemma3": _config_gemma3,
}


def special_ids(md: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids for config.json; an end-of-turn token also stops generation."""
    meta = Metadata(md, "tokenizer.ggml.")
    ids: dict[str, Any] = {}
    if (bos := meta.token_id("bos_token_id")) is not None:
        ids["bos_token_id"] = bos
    eos, eot = meta.token_id("eos_token_id"), meta.token_id("eot_token_id")
    if eos is not None:
        ids["eos_token_id"] = eos if eot in (None, eos) else [eos, eot]
    if (pad := meta.token_id("padding_token_id")) is not None:
        ids["pad_token_id"] = pad
    return ids
