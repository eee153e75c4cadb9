"""Converter: every input format and family gives the weights and logits of the source."""

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from ifp_mlx.convert import ConversionError, ConvertOptions, convert
from safetensors.numpy import load_file, save_file
from tiny import write_hf_folder

from ifp_mlx.model.load import load

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3_text"]
TOKENS = mx.array([[1, 5, 7, 9, 11, 200, 3, 42]])


def max_logit_diff(model_dir: Path, hf_dir: Path) -> float:
    ours = load(model_dir).model(TOKENS)
    ref, _ = mlx_lm.load(str(hf_dir))
    return float(mx.abs(ours - ref(TOKENS)).max())


def converted_arrays(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for name in ("weights.safetensors", "ffn_bank.safetensors"):
        arrays.update({k: np.array(v) for k, v in mx.load(str(folder / name)).items()})
    return arrays


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def shard(hf: Path, parts: int = 2) -> None:
    """Split model.safetensors into shards with an index, as HF does."""
    weights = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: weights[n] for n in names[i::parts]}
        save_file(chunk, str(hf / fname))
        weight_map.update({n: fname for n in chunk})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_safetensors_matches_mlx_lm(tmp_path, family):
    write_hf_folder(tmp_path / "hf", family)
    convert(tmp_path / "hf", tmp_path / "out", ConvertOptions(dtype="float32"))
    assert max_logit_diff(tmp_path / "out", tmp_path / "hf") <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_sharded_equals_single(tmp_path, family):
    write_hf_folder(tmp_path / "hf", family)
    convert(tmp_path / "hf", tmp_path / "single")
    shard(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "sharded")
    assert_same_arrays(converted_arrays(tmp_path / "single"), converted_arrays(tmp_path / "sharded"))


def test_single_file_needs_config(tmp_path):
    write_hf_folder(tmp_path / "hf", "llama")
    with pytest.raises(ConversionError, match="--config"):
        convert(tmp_path / "hf" / "model.safetensors", tmp_path / "out")
    convert(tmp_path / "hf" / "model.safetensors", tmp_path / "out", config_path=tmp_path / "hf" / "config.json")
    assert max_logit_diff(tmp_path / "out", tmp_path / "hf") <= 1e-4


def test_prefixed_names_are_canonicalised(tmp_path):
    weights = write_hf_folder(tmp_path / "hf", "qwen2")
    save_file({f"llm.{k}": v for k, v in weights.items()}, str(tmp_path / "hf" / "model.safetensors"))
    convert(tmp_path / "hf", tmp_path / "out")
    write_hf_folder(tmp_path / "ref", "qwen2")
    assert max_logit_diff(tmp_path / "out", tmp_path / "ref") <= 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(tmp_path, dtype):
    weights = write_hf_folder(tmp_path / "hf", "llama")
    convert(tmp_path / "hf", tmp_path / "out", ConvertOptions(dtype=dtype))
    arrays = mx.load(str(tmp_path / "out" / "ffn_bank.safetensors"))
    bank = arrays["bank.weight"]
    assert bank.dtype == getattr(mx, dtype)
    gate = np.array(bank[0, :, 0].astype(mx.float32))
    expected = np.array(mx.array(weights["model.layers.0.mlp.gate_proj.weight"]).astype(getattr(mx, dtype)).astype(mx.float32))
    np.testing.assert_array_equal(gate, expected)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["ifp"]["dtype"] == dtype


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bank_is_quantized_along_d(tmp_path, bits):
    weights = write_hf_folder(tmp_path / "hf", "llama")
    convert(tmp_path / "hf", tmp_path / "out", ConvertOptions(dtype="float32", quantize=True, bits=bits, group_size=32))
    arrays = mx.load(str(tmp_path / "out" / "ffn_bank.safetensors"))
    records = mx.dequantize(arrays["bank.weight"], arrays["bank.scales"], arrays["bank.biases"], group_size=32, bits=bits)
    down = weights["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_allclose(np.array(records[1, :, 2]), down.T, atol=0.15 if bits == 4 else 0.01)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits}
    model = load(tmp_path / "out").model
    assert model(TOKENS).shape == (1, 8, 300)


def test_refuses_to_overwrite_without_force(tmp_path):
    write_hf_folder(tmp_path / "hf", "llama")
    convert(tmp_path / "hf", tmp_path / "out")
    with pytest.raises(ConversionError, match="already exists"):
        convert(tmp_path / "hf", tmp_path / "out")
    convert(tmp_path / "hf", tmp_path / "out", ConvertOptions(force=True))
    assert (tmp_path / "out" / "config.json").exists()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".out", "out")))


def test_truncated_safetensors(tmp_path):
    write_hf_folder(tmp_path / "hf", "llama")
    path = tmp_path / "hf" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConversionError, match="truncated") as e:
        convert(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert leftovers(tmp_path) == []


def test_missing_shard(tmp_path):
    write_hf_folder(tmp_path / "hf", "qwen2")
    shard(tmp_path / "hf", parts=3)
    (tmp_path / "hf" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ConversionError, match="missing shard model-00002-of-00003.safetensors"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "weight_map, message",
    [
        (None, "no weight_map in the shard index"),
        ({"a": "../outside.safetensors"}, "shard '../outside.safetensors' is not a file name in the model folder"),
        ({"a": "/etc/passwd"}, "shard '/etc/passwd' is not a file name"),
    ],
)
def test_a_bad_shard_index_is_refused(tmp_path, weight_map, message):
    write_hf_folder(tmp_path / "hf", "qwen2")
    shard(tmp_path / "hf", parts=2)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_text(json.dumps({} if weight_map is None else {"weight_map": weight_map}))
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(tmp_path / "hf", tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_unknown_architecture(tmp_path):
    write_hf_folder(tmp_path / "hf", "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["model_type"] = "mamba"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="unsupported model family 'mamba'.*gemma3_text.*llama.*qwen2"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("tie_word_embeddings", "no"), ("eos_token_id", "x")])
def test_a_source_config_that_would_not_load_is_refused_before_writing(tmp_path, field, value):
    """What loading would refuse is refused by the converter, before a byte is written."""
    write_hf_folder(tmp_path / "hf", "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=f"hf/config.json: {field} is"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_failure_midway_leaves_no_output(tmp_path):
    """A tensor whose data is cut off only shows when read: still no output folder."""
    write_hf_folder(tmp_path / "hf", "llama")
    path = tmp_path / "hf" / "model.safetensors"
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    name = "model.layers.1.mlp.up_proj.weight"
    header[name]["shape"] = [96, 63]  # wrong shape: caught before writing
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + path.read_bytes()[8 + header_len :])
    with pytest.raises(ConversionError, match="up_proj.weight has shape"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_missing_source(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["pytorch", "pytorch-legacy"])
def test_tiny_pytorch_matches_safetensors(tmp_path, family, fmt):
    pytest.importorskip("torch")
    write_hf_folder(tmp_path / "st", family)
    write_hf_folder(tmp_path / "pt", family, fmt=fmt)
    convert(tmp_path / "st", tmp_path / "from_st")
    convert(tmp_path / "pt", tmp_path / "from_pt")
    assert_same_arrays(converted_arrays(tmp_path / "from_st"), converted_arrays(tmp_path / "from_pt"))


def test_single_pt_file_with_config(tmp_path):
    pytest.importorskip("torch")
    from tiny import save_torch

    weights = write_hf_folder(tmp_path / "hf", "qwen3")
    save_torch(weights, tmp_path / "weights.pt")
    convert(tmp_path / "weights.pt", tmp_path / "out", config_path=tmp_path / "hf" / "config.json")
    assert max_logit_diff(tmp_path / "out", tmp_path / "hf") <= 1e-4


def test_malicious_pickle_is_refused(tmp_path):
    """A reduce that calls os.system is refused by name and never runs."""
    import pickle

    marker = tmp_path / "MARKER"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    write_hf_folder(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(ConversionError, match="system"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert not marker.exists()
    assert leftovers(tmp_path) == []
