"""Bounded fuzzing of the GGUF reader: config, tensors and tokenizer (see tests/fuzzing.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fuzzing import Case, Hot, Seed, _read_all, mutate, run_and_report
from ifp_mlx.convert.gguf_reader import read_gguf

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 2, 1, 16, 32
GPT2_VOCAB = ["<s>", "</s>", "h", "e", "l", "o", "w", "he", "ll", "hell", "hello", "Ġ", "Ġw"]
SPM_VOCAB = ["<unk>", "<s>", "</s>", "▁", "h", "e", "he", "▁he", "<0x41>", "<0xC3>"]


def _tokenizer_kv(kind: str) -> dict:
    from gguf import GGUFValueType as V

    tokens = GPT2_VOCAB if kind == "gpt2" else SPM_VOCAB
    types = [3, 3] + [1] * (len(tokens) - 2)
    if kind == "llama":
        types = [2, 3, 3] + [1] * (len(tokens) - 5) + [6, 6]
    kv = {
        "tokenizer.ggml.model": (kind, V.STRING),
        "tokenizer.ggml.pre": ("smollm" if kind == "gpt2" else "default", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY),
        "tokenizer.ggml.token_type": (types, V.ARRAY),
        "tokenizer.ggml.bos_token_id": (1 if kind == "llama" else 0, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2 if kind == "llama" else 1, V.UINT32),
        "tokenizer.ggml.padding_token_id": (1, V.UINT32),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),
        "tokenizer.chat_template": ("{{ messages[0]['content'] }}", V.STRING),
    }
    if kind == "gpt2":
        kv["tokenizer.ggml.merges"] = (["h e", "l l", "he ll", "hell o", "Ġ w"], V.ARRAY)
    else:
        kv["tokenizer.ggml.scores"] = ([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)], V.ARRAY)
        kv["tokenizer.ggml.unknown_token_id"] = (0, V.UINT32)
        kv["tokenizer.ggml.add_space_prefix"] = (True, V.BOOL)
    return kv


def _hparams_kv(arch: str) -> dict:
    from gguf import GGUFValueType as V

    kv = {
        f"{arch}.block_count": (1, V.UINT32),
        f"{arch}.context_length": (256, V.UINT32),
        f"{arch}.embedding_length": (HIDDEN, V.UINT32),
        f"{arch}.feed_forward_length": (FFN, V.UINT32),
        f"{arch}.attention.head_count": (HEADS, V.UINT32),
        f"{arch}.attention.head_count_kv": (KV_HEADS, V.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        f"{arch}.rope.freq_base": (10000.0, V.FLOAT32),
        f"{arch}.rope.dimension_count": (HEAD_DIM, V.UINT32),
    }
    if arch == "llama":
        kv[f"{arch}.rope.scaling.type"] = ("linear", V.STRING)
        kv[f"{arch}.rope.scaling.factor"] = (2.0, V.FLOAT32)
    else:
        kv[f"{arch}.attention.key_length"] = (HEAD_DIM, V.UINT32)
        kv[f"{arch}.attention.sliding_window_pattern"] = ([True, False], V.ARRAY)
    return kv


def _gguf_tensors(arch: str, vocab: int) -> list[tuple[str, np.ndarray, str]]:
    """(name, float32 data, storage type) for a one-layer model."""
    rng = np.random.default_rng(1)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    t = [
        ("token_embd.weight", w(vocab, HIDDEN), "Q8_0"),
        ("output_norm.weight", 1 + w(HIDDEN), "F32"),
        ("blk.0.attn_norm.weight", 1 + w(HIDDEN), "F32"),
        ("blk.0.ffn_norm.weight", 1 + w(HIDDEN), "F32"),
        ("blk.0.attn_q.weight", w(HEADS * HEAD_DIM, HIDDEN), "Q4_0"),
        ("blk.0.attn_k.weight", w(KV_HEADS * HEAD_DIM, HIDDEN), "Q8_0"),
        ("blk.0.attn_v.weight", w(KV_HEADS * HEAD_DIM, HIDDEN), "F16"),
        ("blk.0.attn_output.weight", w(HIDDEN, HEADS * HEAD_DIM), "Q4_1"),
        ("blk.0.ffn_gate.weight", w(FFN, HIDDEN), "F32"),
        ("blk.0.ffn_up.weight", w(FFN, HIDDEN), "BF16"),
        ("blk.0.ffn_down.weight", w(HIDDEN, FFN), "Q4_0"),
    ]
    if arch == "gemma3":
        t += [("blk.0.post_attention_norm.weight", w(HIDDEN), "F32"), ("blk.0.post_ffw_norm.weight", w(HIDDEN), "F32")]
        t += [("blk.0.attn_q_norm.weight", w(HEAD_DIM), "F32"), ("blk.0.attn_k_norm.weight", w(HEAD_DIM), "F32")]
    else:
        t.append(("output.weight", w(vocab, HIDDEN), "Q8_0"))
    if arch == "llama":
        t.append(("rope_freqs.weight", _llama3_rope_factors(10000.0, 8.0), "F32"))
    return t


def _llama3_rope_factors(theta: float, factor: float) -> np.ndarray:
    """The per-frequency factors llama.cpp stores for Llama 3 RoPE scaling."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    smooth = (8192 / wavelen - 1) / 3
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, factor, ramp)).astype(np.float32)


def _write_gguf(path: Path, arch: str, tok: str, kv: dict) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype) in kv.items():
        writer.add_key_value(key, value, vtype)
    vocab = len(GPT2_VOCAB if tok == "gpt2" else SPM_VOCAB)
    for name, x, kind in _gguf_tensors(arch, vocab):
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, x)
        elif kind == "F16":
            writer.add_tensor(name, x.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _gguf_hot(path: Path) -> Hot:
    """Every integer field of the header, located through gguf's own reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    return [
        (part.ctypes.data - base, part.dtype.itemsize)
        for f in fields
        for part in f.parts
        if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8) and part.size == 1
    ]


def _random_value(rng: random.Random):
    from gguf import GGUFValueType as V

    return rng.choice(
        [
            (rng.choice([0, 1, 3, 2**31, 2**32 - 1]), V.UINT32),
            (rng.choice([-1, -(2**63), 2**62]), V.INT64),
            (rng.choice([2**64 - 1, 2**60]), V.UINT64),
            (rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30]), V.FLOAT32),
            (rng.choice(["", "x", "gpt2", "llama", "bert", "yarn", "linear", "qwen2", "a b c"]), V.STRING),
            (rng.choice([True, False]), V.BOOL),
            (rng.choice([["a", "b"], ["h e", "x"], ["only"]]), V.ARRAY),
            (rng.choice([[1, 2, 3], [-5], [0] * 20, [2**31 - 1]]), V.ARRAY),
            (rng.choice([[1.5, float("nan")], [0.0]]), V.ARRAY),
            (rng.choice([[True, False], [False]]), V.ARRAY),
            ([[1, 2], [3, 4]], V.ARRAY),
        ]
    )


GGUF_KINDS = [("llama", "gpt2"), ("gemma3", "llama"), ("qwen2", "gpt2")]


def _metadata_variant(tmp: Path, arch: str, tok: str) -> Callable[[random.Random], Case]:
    """The seed rewritten with one metadata key dropped or given an odd value and type."""

    def make(rng: random.Random) -> Case:
        kv = {**_hparams_kv(arch), **_tokenizer_kv(tok)}
        key = rng.choice(sorted(kv))
        if rng.random() < 0.15:
            del kv[key]
            steps = [f"without {key}"]
        else:
            kv[key] = _random_value(rng)
            steps = [f"{key}={kv[key][0]!r} as {kv[key][1].name}"]
        data = _write_gguf(tmp / "variant.gguf", arch, tok, kv)
        if rng.random() < 0.6:
            return data, steps
        data, more = mutate(rng, data, [])
        return data, steps + more

    return make


def _gguf_seeds(tmp: Path) -> list[Seed]:
    seeds = []
    for arch, tok in GGUF_KINDS:
        path = tmp / f"{arch}.gguf"
        data = _write_gguf(path, arch, tok, {**_hparams_kv(arch), **_tokenizer_kv(tok)})
        seeds.append(Seed(f"gguf-{arch}", data, _gguf_hot(path)))
        seeds.append(Seed(f"gguf-{arch}-metadata", data, [], _metadata_variant(tmp, arch, tok)))
    return seeds


def _check_gguf(path: Path, out: Path) -> None:
    ck = read_gguf(path)
    json.dumps(ck.config)
    _read_all(ck.tensors)
    ck.write_tokenizer(out)


def test_fuzz_gguf(tmp_path):
    pytest.importorskip("gguf")
    seeds = _gguf_seeds(tmp_path)
    for seed in seeds[::2]:  # the unmutated seeds read cleanly
        (tmp_path / "check.gguf").write_bytes(seed.data)
        _check_gguf(tmp_path / "check.gguf", tmp_path / "check_out")
    run_and_report(seeds, ".gguf", _check_gguf, tmp_path / "work", "gguf")
