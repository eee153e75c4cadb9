"""Tiny random-weight Hugging Face checkpoints of every family, built in the tests,
so every family can be round-tripped through every input format in milliseconds."""

from pathlib import Path

import numpy as np
from ifp_mlx.convert.random_model import random_weights, write_random_hf_folder

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|pad|>")  # bos, eos, pad
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
    return random_weights(config, seed)


def write_hf_folder(folder: Path, family: str, fmt: str = "safetensors", seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """Write a tiny HF model folder; returns its float32 weights."""
    config = tiny_config(family, **overrides)
    weights = write_random_hf_folder(folder, config, seed, SPECIALS, CHAT_TEMPLATE)
    if fmt != "safetensors":
        (folder / "model.safetensors").unlink()
        save_torch(weights, folder / "pytorch_model.bin", legacy=fmt == "pytorch-legacy")
    return weights


def save_torch(weights: dict[str, np.ndarray], path: Path, legacy: bool = False) -> None:
    """Write a state dict with real torch.save (zip format, or the pre-1.6 one)."""
    import torch

    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
