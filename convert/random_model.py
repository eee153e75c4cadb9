"""Random-weight models of real shapes, for tests and benchmarks.

Weights come from mlx-lm's own model classes (random init) under Hugging Face
names, with a byte-level BPE tokenizer, written as a plain HF folder: going
through the real converter means tests and benchmarks use exactly the folders
users get.
"""

import json
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from .convert import ConvertOptions, convert


def random_llama_config(hidden: int, d_ff: int, layers: int, vocab: int = 2048) -> dict:
    """A llama config of the given shapes (head_dim 64, 4 query heads per KV head).

    No ``eos_token_id``, and the tokenizer has none either: random weights
    would otherwise stop a timed reply at an arbitrary length.
    """
    heads = max(1, hidden // 64)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": d_ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """mlx-lm's random initialisation under HF names, float32, with norms made
    non-trivial (all-ones norms would hide a norm that is read wrongly)."""
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    rng = np.random.default_rng(seed)
    for name in weights:
        if name.endswith("norm.weight"):
            weights[name] = (weights[name] + rng.normal(0, 0.1, weights[name].shape)).astype(np.float32)
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    return weights


def write_byte_tokenizer(
    folder: Path, vocab_size: int, specials: Sequence[str] = (), chat_template: Optional[str] = None
) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens.

    Ids 0..255 are the bytes, then ``specials`` (the first two serve as bos and
    eos), then generated two-byte merges, so every id a random model can emit
    decodes through mlx-lm's fast BPE streaming detokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 256 + len(specials):
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {256 + len(specials)}, got {vocab_size}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    reserved = {t: 256 + i for i, t in enumerate(specials)}
    merges = [(alphabet[i // 256], alphabet[i % 256]) for i in range(vocab_size - 256 - len(specials))]
    for a, b in merges:
        vocab[a + b] = len(vocab) + len(reserved)
    tokenizer = Tokenizer(models.BPE(vocab={**vocab, **reserved}, merges=merges))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, token in zip(("bos_token", "eos_token", "pad_token"), specials):
        tokenizer_config[key] = token
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def write_random_hf_folder(
    folder: Path, config: dict, seed: int = 0, specials: Sequence[str] = (), chat_template: Optional[str] = None
) -> dict[str, np.ndarray]:
    """A random-weight HF folder (config, model.safetensors, tokenizer); returns its weights."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(config, seed)
    (folder / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(folder, config["vocab_size"], specials, chat_template)
    save_file(weights, str(folder / "model.safetensors"))
    return weights


def build_random_model(out: Path, config: dict, seed: int = 0, options: Optional[ConvertOptions] = None) -> Path:
    """Write a random-weight HF folder and convert it (float32 by default) into ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        write_random_hf_folder(Path(tmp), config, seed)
        convert(tmp, out, options or ConvertOptions(dtype="float32", force=True))
    return out
