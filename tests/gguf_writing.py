"""Writing tiny GGUF files the way llama.cpp's convert script does, for the GGUF tests.

Q/K rows are permuted for llama and gemma norms stored as w + 1, so reading
them back exercises the layout fixes; `roundtrip` says what a tensor stored
as a given type decodes to.
"""

import importlib
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert.gguf_tokenizer import bytes_to_unicode

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 2

# A tiny byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, 5 merges.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = list(bytes_to_unicode().values())
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w"]
GPT2_TOKENS = SPECIALS + BYTES + ["he", "ll", "hell", "hello", "Ġw"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def block_gguf(monkeypatch):
    """Make `import gguf` fail inside the reader, as on a machine without the package."""
    for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        monkeypatch.setitem(sys.modules, name, None)


# ---------------------------------------------------------------------------
# Writing GGUFs like llama.cpp does
# ---------------------------------------------------------------------------


def n_layers(arch: str) -> int:
    # mlx-lm's gemma3_text indexes the cache at sliding_window_pattern - 1: it needs 6 layers.
    return 6 if arch == "gemma3" else LAYERS


def hf_tensors(
    arch: str, vocab: int, tied: bool, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {
        "model.embed_tokens.weight": w(vocab, HIDDEN),
        "model.norm.weight": 1 + w(HIDDEN),
    }
    if not tied:
        t["lm_head.weight"] = w(vocab, HIDDEN)
    for i in range(n_layers(arch)):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = w(HIDDEN, HEADS * HEAD_DIM)
        t[p + "mlp.gate_proj.weight"] = w(FFN, HIDDEN)
        t[p + "mlp.up_proj.weight"] = w(FFN, HIDDEN)
        t[p + "mlp.down_proj.weight"] = w(HIDDEN, FFN)
        t[p + "input_layernorm.weight"] = 1 + w(HIDDEN)
        t[p + "post_attention_layernorm.weight"] = 1 + w(HIDDEN)
        if arch == "qwen2":
            for k, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                t[p + f"self_attn.{k}_proj.bias"] = w(n * HEAD_DIM)
        if arch in ("gemma3", "qwen3"):
            t[p + "self_attn.q_norm.weight"] = w(HEAD_DIM)
            t[p + "self_attn.k_norm.weight"] = w(HEAD_DIM)
        if arch == "gemma3":
            t[p + "pre_feedforward_layernorm.weight"] = w(HIDDEN)
            t[p + "post_feedforward_layernorm.weight"] = w(HIDDEN)
            t[p + "input_layernorm.weight"] = w(HIDDEN)
            t[p + "post_attention_layernorm.weight"] = w(HIDDEN)
    if arch == "gemma3":
        t["model.norm.weight"] = w(HIDDEN)
    return t


GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
GEMMA_BLOCK = {
    **GGUF_BLOCK,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
TOP = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def gguf_name(arch: str, hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem in TOP:
        return f"{TOP[stem]}.{suffix}"
    _, _, i, rest = stem.split(".", 3)
    return f"blk.{i}.{(GEMMA_BLOCK if arch == 'gemma3' else GGUF_BLOCK)[rest]}.{suffix}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def to_gguf_layout(arch: str, hf: str, x: np.ndarray) -> np.ndarray:
    if arch == "llama" and "q_proj" in hf:
        return llama_permute(x, HEADS)
    if arch == "llama" and "k_proj" in hf:
        return llama_permute(x, KV_HEADS)
    if arch == "gemma3" and hf.endswith("norm.weight"):
        return x + 1
    return x


def add_gpt2_tokenizer(w, pre="smollm", add_bos=False):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(GPT2_TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(GPT2_TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)


def add_hparams(w, arch: str):
    w.add_block_count(n_layers(arch))
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5 if arch != "gemma3" else 1e-6)
    w.add_rope_freq_base(100000.0 if arch != "gemma3" else 1e6)
    if arch == "llama":
        w.add_rope_dimension_count(HEAD_DIM)
    else:
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
    if arch == "gemma3":
        w.add_sliding_window(512)


def encode(x: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    if qtype == Q.F32:
        return x, None
    if qtype == Q.F16:
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, qtype), qtype


def write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    qtype=Q.F32,
    types: dict[str, Q] | None = None,
    extra=None,
    tokenizer=add_gpt2_tokenizer,
) -> Path:
    """Write like llama.cpp: 2-D weights in `qtype` (or per-tensor `types`), 1-D in F32."""
    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, arch)
    if tokenizer is not None:
        tokenizer(w)
    if extra is not None:
        extra(w)
    for hf, x in tensors.items():
        g = to_gguf_layout(arch, hf, x)
        t = (types or {}).get(hf, qtype if x.ndim == 2 else Q.F32)
        data, raw = encode(g, t)
        w.add_tensor(gguf_name(arch, hf), data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip(x: np.ndarray, qtype: Q) -> np.ndarray:
    """What a tensor stored as `qtype` decodes to (quant blocks run along rows)."""
    if qtype == Q.F32 or x.ndim == 1:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)


def build_mlx_model(config: dict, weights: dict[str, np.ndarray]):
    """Instantiate the mlx-lm model the config names and load the weights strictly."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    w = model.sanitize({k: mx.array(v) for k, v in weights.items()})
    model.load_weights(list(w.items()), strict=True)
    return model



def load_tokenizers(folder: Path):
    from mlx_lm.tokenizer_utils import load as mlx_load_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)), mlx_load_tokenizer(folder)
