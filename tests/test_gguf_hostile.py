"""GGUF files that are corrupt or hostile: one quick ConversionError that names the file."""

import time
from pathlib import Path

import numpy as np
import pytest
from ifp_mlx.convert.errors import ConversionError
from ifp_mlx.convert.gguf_reader import read_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf_writing import (  # noqa: E402
    GPT2_TOKENS,
    HIDDEN,
    add_gpt2_tokenizer,
    add_hparams,
    gguf_name,
    hf_tensors,
    write_gguf,
)


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
