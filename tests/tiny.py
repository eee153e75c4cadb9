"""Tiny random-weight Hugging Face checkpoints, built in the tests.

Weights come from mlx-lm's own model classes (random init), saved under HF
names, with a small byte-level BPE tokenizer, so every family can be
round-tripped through every input format in milliseconds.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 300,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
}

FAMILY_CONFIGS = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu"},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu"},
    "gemma3_text": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_local_base_freq": 10000.0,
        "num_hidden_layers": 3,
        "tie_word_embeddings": True,
    },
}


def tiny_config(family: str, **overrides) -> dict:
    return {**BASE, **FAMILY_CONFIGS[family], **overrides}


def tiny_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face names."""
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    rng = np.random.default_rng(seed)
    for name in weights:
        if name.endswith("norm.weight"):  # make norms non-trivial
            weights[name] = (weights[name] + rng.normal(0, 0.1, weights[name].shape)).astype(np.float32)
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    return weights


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer: 256 bytes, three specials, a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab) + 3
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>", "<|pad|>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE,
    }))


def write_hf_folder(folder: Path, family: str, fmt: str = "safetensors", seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """Write a tiny HF model folder; returns its float32 weights."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, **overrides)
    weights = tiny_weights(config, seed)
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder)
    if fmt == "safetensors":
        save_file(weights, str(folder / "model.safetensors"))
    else:
        save_torch(weights, folder / "pytorch_model.bin", legacy=fmt == "pytorch-legacy")
    return weights


def save_torch(weights: dict[str, np.ndarray], path: Path, legacy: bool = False) -> None:
    """Write a state dict with real torch.save (zip format, or the pre-1.6 one)."""
    import torch

    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
