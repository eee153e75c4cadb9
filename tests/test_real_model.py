"""The real SmolLM2-135M-Instruct: every input format, logits against mlx-lm, answers."""

import mlx.core as mx
import mlx_lm
import pytest
from ifp_mlx.convert import ConvertOptions, convert
from safetensors.numpy import load_file
from test_convert import assert_same_arrays, converted_arrays

from ifp_mlx.engine.engine import Engine
from ifp_mlx.engine.prompts import prompt_tokens
from ifp_mlx.engine.stats import GenerationConfig, GenerationStats


def test_gguf_safetensors_and_pytorch_give_identical_weights(smollm2_dir, smollm2_hf, tmp_path):
    from_gguf = converted_arrays(smollm2_dir)
    convert(smollm2_hf, tmp_path / "from_st", ConvertOptions(dtype="float32"))
    assert_same_arrays(from_gguf, converted_arrays(tmp_path / "from_st"))

    pytest.importorskip("torch")
    from tiny import save_torch

    pt = tmp_path / "pt"
    pt.mkdir()
    for f in smollm2_hf.iterdir():
        if f.name != "model.safetensors":
            (pt / f.name).write_bytes(f.read_bytes())
    save_torch(load_file(str(smollm2_hf / "model.safetensors")), pt / "pytorch_model.bin")
    convert(pt, tmp_path / "from_pt", ConvertOptions(dtype="float32"))
    assert_same_arrays(from_gguf, converted_arrays(tmp_path / "from_pt"))


def test_logits_match_mlx_lm_on_plain_hf_folder(smollm2, smollm2_hf):
    reference, tokenizer = mlx_lm.load(str(smollm2_hf))
    tokens = mx.array([prompt_tokens(smollm2.tokenizer, "Write a haiku about the sea.")])
    diff = mx.abs(smollm2.model(tokens) - reference(tokens)).max().item()
    assert diff <= 1e-4


def test_answers_capital_of_france(smollm2):
    tokens = prompt_tokens(smollm2.tokenizer, "What is the capital of France?")
    stats = GenerationStats()
    reply = "".join(Engine(smollm2).generate(tokens, GenerationConfig(max_tokens=24), stats))
    assert "Paris" in reply
    assert stats.generation_tokens > 0 and stats.prompt_tokens == len(tokens)


def test_stream_never_splits_a_character(smollm2):
    """Multi-byte characters spread over byte-level tokens stream whole."""
    text = "Voilà: 日本語 🙂 — ok"
    ids = smollm2.tokenizer.encode(text, add_special_tokens=False)
    detok = smollm2.tokenizer.detokenizer
    detok.reset()
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text.split())  # the emoji and kanji really span several tokens
