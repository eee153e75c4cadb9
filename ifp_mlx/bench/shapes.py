"""Random-weight models of real model shapes, for sizes beyond the packaged models.

Speed and memory depend on shapes, not on weight values, so a random model of
Llama 3.2 3B's shapes runs as fast and holds as much as the real one. The
vocabulary is smaller by default (a random model's embedding table and output
layer only need to be as wide as the generated tokenizer): that makes the
non-FFN weights, and so the bytes read per decoded token, smaller than the
real model's. ``vocab`` restores the real width.

The converter (and with it MLX) is imported only where a model is configured
or built, so that a bad ``--shape`` or ``--bits`` is refused at once.
"""

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import IFPError

RANDOM_VOCAB = 32768  # the default vocabulary of a random-weight model
BITS = (2, 3, 4, 5, 6, 8)
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Shape:
    """A real model's shapes (the sizes from its published config)."""

    model_type: str
    hidden: int
    d_ff: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # the real model's vocabulary
    tied: bool
    rope_theta: float


SHAPES = {
    "llama-1b": Shape("llama", 2048, 8192, 16, 32, 8, 64, 128256, True, 500000.0),  # Llama 3.2 1B
    "llama-3b": Shape("llama", 3072, 8192, 28, 24, 8, 128, 128256, True, 500000.0),  # Llama 3.2 3B
    "llama-8b": Shape("llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 500000.0),  # Llama 3.1 8B
    "qwen2.5-1.5b": Shape("qwen2", 1536, 8960, 28, 12, 2, 128, 151936, True, 1000000.0),  # Qwen2.5 1.5B
}


def shape(name: str) -> Shape:
    if name not in SHAPES:
        raise IFPError(f"unknown shape {name!r}: choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def shape_config(name: str, layers: Optional[int] = None, vocab: Optional[int] = None) -> dict:
    """A Hugging Face config of the shape's sizes (``layers``/``vocab`` override them)."""
    from ..convert.random_model import random_llama_config

    s = shape(name)
    layers = s.layers if layers is None else layers
    vocab = RANDOM_VOCAB if vocab is None else vocab
    if layers < 1:
        raise IFPError(f"--layers must be at least 1 (got {layers})")
    if vocab < 512:
        raise IFPError(f"--vocab must be at least 512 (got {vocab})")
    config = random_llama_config(s.hidden, s.d_ff, layers, vocab)
    config.update(
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        tie_word_embeddings=s.tied, rope_theta=s.rope_theta, max_position_embeddings=8192,
    )
    if s.model_type == "qwen2":
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return config


def check_build(dtype: str, bits: Optional[int]) -> None:
    """Refuse a dtype or bit width the converter would refuse, before building anything."""
    if dtype not in DTYPES:
        raise IFPError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if bits is not None and bits not in BITS:
        raise IFPError(f"--bits must be one of {', '.join(map(str, BITS))} (got {bits})")


def shape_tag(name: str, config: dict, dtype: str, quantize: bool, bits: int) -> str:
    """A folder name that tells two builds of a shape apart."""
    quant = f"-q{bits}" if quantize else ""
    return f"{name}-L{config['num_hidden_layers']}-v{config['vocab_size']}-{dtype}{quant}"


@contextmanager
def shape_model(
    name: str,
    dtype: str = "float32",
    quantize: bool = False,
    bits: Optional[int] = None,
    layers: Optional[int] = None,
    vocab: Optional[int] = None,
    cache: Optional[Path] = None,
    log=lambda message: None,
) -> Iterator[Path]:
    """A converted random-weight model of the shape: built in ``cache`` (and reused
    from there next time), else in a temporary folder removed afterwards."""
    from ..convert import ConvertOptions
    from ..convert.random_model import build_random_model

    check_build(dtype, bits)
    quantize = quantize or bits is not None  # --bits alone asks for quantization
    bits = bits or 4
    config = shape_config(name, layers, vocab)
    options = ConvertOptions(dtype=dtype, quantize=quantize, bits=bits, group_size=64, force=True)
    tag = shape_tag(name, config, dtype, quantize, bits)
    if cache is not None:
        out = Path(cache) / tag
        if not (out / "config.json").exists():
            log(f"building a random-weight {tag} in {out}")
            build_random_model(out, config, options=options)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="ifp-bench-") as tmp:
        log(f"building a random-weight {tag} in a temporary folder")
        yield build_random_model(Path(tmp) / tag, config, options=options)
