"""GGUF -> Hugging Face checkpoint: tensors, config and decoding.

Tiny GGUF files are written (tests/gguf_writing.py) with `gguf.GGUFWriter` the way
llama.cpp's convert script writes them (Q/K rows permuted for llama, gemma norms stored
as w + 1), then read back and compared with the original HF tensors.
"""

import importlib
import json

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert.errors import ConversionError
from ifp_mlx.convert.gguf_reader import read_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf_writing import (  # noqa: E402
    FFN,
    GPT2_TOKENS,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    add_gpt2_tokenizer,
    add_hparams,
    block_gguf,
    build_mlx_model,
    gguf_name,
    hf_tensors,
    llama_permute,
    n_layers,
    roundtrip,
    write_gguf,
)


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
