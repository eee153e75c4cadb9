"""Read a GGUF file as a Hugging Face checkpoint: tensors, config and tokenizer.

The converter downstream only understands Hugging Face checkpoints, so this
module hides everything llama.cpp does differently: reversed dimensions,
its own tensor names, Q/K rows permuted for its rotary layout (llama), RMSNorm
weights stored as ``w + 1`` (gemma), hyper-parameters it hard-codes instead of
storing, and a tokenizer kept as metadata rather than as ``tokenizer.json``.

The header is parsed here in pure Python and tensor bytes are read through a
memory map, one tensor per ``read()``. ``mx.load`` also reads GGUF, but it
copies the whole file into memory up front (98 MB active for a 98 MB file),
and it silently turns K-quants into float16 while failing outright on Q5_0,
so it can neither stream a large model nor say which tensor is the problem.
F32/F16/BF16 and the block formats Q4_0, Q4_1 and Q8_0 are dequantized with
numpy (bit-identical to ``gguf.quants``); every other quant type needs the
optional ``gguf`` package.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConversionError
from .tensors import SourceTensor, bf16_to_float32

# ---------------------------------------------------------------------------
# The GGUF container
# ---------------------------------------------------------------------------

# ggml type id -> (name, elements per block, bytes per block), from ggml.c.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# Metadata value type -> struct format (little-endian) and numpy dtype.
_SCALARS: dict[int, tuple[str, Any]] = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


@dataclass
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF's dims reversed
    type_id: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}",))[0]


class _Cursor:
    """Sequential little-endian reads from the mapped header."""

    def __init__(self, buf: mmap.mmap | bytes):
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS:
                # Numeric arrays (token types, scores) in one numpy call.
                dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dtype, count, self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ConversionError(f"GGUF metadata has unknown value type {vtype}")
        value = self.scalar(_SCALARS[vtype][0])
        return _f32(value) if vtype == _FLOAT32 else value


def _f32(value: float) -> float:
    """The shortest decimal that round-trips a float32 (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _parse_gguf(path: Path) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """Metadata and the tensor table; no tensor data is touched."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ConversionError(f"{path} is empty, not a GGUF file") from None
    try:
        cur = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ConversionError(f"{path} is not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ConversionError(
                f"{path}: GGUF version {version} is not supported (2 and 3 are;"
                " big-endian files are not)"
            )
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        table = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            table.append(
                (name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q"))
            )
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
        size = len(buf)
    except struct.error:
        raise ConversionError(f"{path} is a truncated or corrupt GGUF file") from None
    finally:
        buf.close()

    infos = []
    for name, shape, type_id, offset in table:
        nbytes = _tensor_nbytes(name, shape, type_id)
        info = _TensorInfo(name, shape, type_id, data_start + offset, nbytes)
        if nbytes is not None and info.offset + nbytes > size:
            raise ConversionError(
                f"{path} is truncated: tensor {name} runs past the end"
            )
        infos.append(info)
    return metadata, infos


def _tensor_nbytes(name: str, shape: tuple[int, ...], type_id: int) -> int | None:
    if type_id not in GGML_TYPES:
        return None  # reported by _check_types, which knows whether gguf can help
    _, block, block_bytes = GGML_TYPES[type_id]
    cols = shape[-1] if shape else 1
    if cols % block:
        raise ConversionError(
            f"tensor {name}: row length {cols} is not a multiple of the"
            f" {GGML_TYPES[type_id][0]} block size {block}"
        )
    return math.prod(shape[:-1]) * (cols // block) * block_bytes


# ---------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------


# ggml's block layouts (ggml-common.h) as numpy record types, so a row of raw
# bytes views as blocks without copying.
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


def _scale(blocks: np.ndarray, field: str) -> np.ndarray:
    return blocks[field].astype(np.float32)[..., None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml packs element j in the low nibble of byte j, element j+16 in the high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _deq_q4_0(raw: np.ndarray) -> np.ndarray:
    b = raw.view(_Q4_0)
    q = _nibbles(b["qs"]).astype(np.int8) - np.int8(8)
    return _scale(b, "d") * q.astype(np.float32)


def _deq_q4_1(raw: np.ndarray) -> np.ndarray:
    b = raw.view(_Q4_1)
    return _scale(b, "d") * _nibbles(b["qs"]).astype(np.float32) + _scale(b, "m")


def _deq_q8_0(raw: np.ndarray) -> np.ndarray:
    b = raw.view(_Q8_0)
    return _scale(b, "d") * b["qs"].astype(np.float32)


def _plain(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda raw: raw.view(dtype).astype(np.float32)


# Decoders from rows of raw bytes; every other type goes through `gguf`.
# The arithmetic matches gguf.quants (float32, same order): results are bit-identical.
_NATIVE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _plain("<f4"),
    "F16": _plain("<f2"),
    "F64": _plain("<f8"),
    "BF16": lambda raw: bf16_to_float32(raw.view("<u2")),
    "I8": _plain("i1"),
    "I16": _plain("<i2"),
    "I32": _plain("<i4"),
    "I64": _plain("<i8"),
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q8_0": _deq_q8_0,
}


def _gguf_quants() -> Callable[[np.ndarray, int], np.ndarray] | None:
    """The optional `gguf` package's dequantizer, or None when it is not installed."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        return None
    return lambda raw, type_id: dequantize(raw, GGMLQuantizationType(type_id))


def _gguf_decoder(info: _TensorInfo) -> Callable[[np.ndarray], np.ndarray]:
    dequantize = _gguf_quants()
    if dequantize is None:
        raise ConversionError(
            f"tensor {info.name} is {info.type_name}, which needs the gguf package:"
            " pip install gguf"
        )
    return lambda chunk: dequantize(chunk, info.type_id)


def _check_types(infos: list[_TensorInfo]) -> None:
    """Fail before conversion starts, not halfway through it."""
    for info in infos:
        name = info.type_name
        if info.type_id not in GGML_TYPES:
            raise ConversionError(
                f"tensor {info.name} has unknown GGML type {info.type_id}"
            )
        if name not in _NATIVE:
            _gguf_decoder(info)


def _dequantize(info: _TensorInfo, data: np.ndarray) -> np.ndarray:
    """One tensor as float32 in numpy order, decoded in row chunks to bound peak memory."""
    name, block, block_bytes = GGML_TYPES[info.type_id]
    cols = info.shape[-1] if info.shape else 1
    rows = info.nbytes // (cols // block * block_bytes)
    raw = data[info.offset : info.offset + info.nbytes].reshape(rows, -1)
    decode = _NATIVE.get(name) or _gguf_decoder(info)
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, (1 << 22) // cols)  # ~16 MB of float32 per chunk
    for r in range(0, rows, step):
        chunk = np.ascontiguousarray(raw[r : r + step])
        out[r : r + step] = decode(chunk).reshape(-1, cols)
    return out.reshape(info.shape)


# ---------------------------------------------------------------------------
# Architectures: names, layout fixes, config
# ---------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

_Tensors = dict[str, SourceTensor]
_Extras = dict[str, Callable[[], np.ndarray]]  # non-weight tensors, e.g. rope_freqs

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 3 wraps both sublayers in norms: GGUF's ffn_norm is the pre-FFN one.
_GEMMA3_NAMES = {
    **_BLOCK_NAMES,
    **_QK_NORM_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_BLOCK_NAMES = {
    "llama": _BLOCK_NAMES,
    "qwen2": _BLOCK_NAMES,
    "qwen3": {**_BLOCK_NAMES, **_QK_NORM_NAMES},
    "gemma3": _GEMMA3_NAMES,
}
# Tensors llama.cpp adds that are not weights: folded into the config instead.
_NOT_WEIGHTS = {"rope_freqs.weight"}


def _hf_name(arch: str, gguf_name: str) -> str:
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise ConversionError(f"unexpected tensor {gguf_name} in a {arch} GGUF")
    parts = stem.split(".")
    if len(parts) == 1 and stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        hf = _ARCH_BLOCK_NAMES[arch].get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}.{suffix}"
    raise ConversionError(f"unexpected tensor {gguf_name} in a {arch} GGUF")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K weight (or bias).

    llama.cpp interleaves each head's two rotary halves; HF keeps them as
    halves. Without this the model's attention is scrambled and it emits
    nothing sensible.
    """
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _fixer(
    arch: str, gguf_name: str, meta: _Meta
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The layout fix a tensor needs after dequantization, if any."""
    kind = gguf_name.rsplit(".", 2)[-2] if gguf_name.count(".") >= 2 else ""
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        n_head = meta.heads if kind == "attn_q" else meta.kv_heads
        # llama.cpp permutes K with the KV head count, Q with the query head count.
        return lambda w: _unpermute(w, n_head)
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        # llama.cpp bakes Gemma's (1 + w) into the stored weight; HF and mlx-lm add the 1.
        return lambda w: w - np.float32(1.0)
    return None


class _Meta:
    """Typed access to `{arch}.*` hyper-parameters with one-line errors."""

    def __init__(self, metadata: dict[str, Any], arch: str):
        self.md = metadata
        self.arch = arch
        self.heads = self.integer("attention.head_count")
        self.kv_heads = self.integer("attention.head_count_kv", self.heads)

    def get(self, key: str, default: Any = ...) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.md:
            return self.md[full]
        if default is ...:
            raise ConversionError(f"GGUF metadata lacks {full}")
        return default

    def integer(self, key: str, default: Any = ...) -> int:
        value = self.get(key, default)
        if isinstance(value, list):
            # Per-layer lists (llama.cpp allows them) must be uniform for these families.
            if len(set(value)) != 1:
                raise ConversionError(
                    f"{self.arch}.{key} varies per layer, which is not supported"
                )
            value = value[0]
        return int(value)


def _base_config(meta: _Meta, tensors: _Tensors) -> dict[str, Any]:
    hidden = meta.integer("embedding_length")
    head_dim = meta.integer("attention.key_length", hidden // meta.heads)
    return {
        "hidden_size": hidden,
        "intermediate_size": meta.integer("feed_forward_length"),
        "num_hidden_layers": meta.integer("block_count"),
        "num_attention_heads": meta.heads,
        "num_key_value_heads": meta.kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get("rope.freq_base", 10000.0)),
        # The embedding is the truth: the vocab_size key is optional and can disagree.
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "max_position_embeddings": meta.integer("context_length", 4096),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "torch_dtype": "float32",  # what read() returns; the converter picks the output dtype
    }


def _rope_scaling(meta: _Meta) -> dict[str, Any] | None:
    kind = meta.get("rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    factor = float(meta.get("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": meta.integer(
                "rope.scaling.original_context_length"
            ),
        }
    raise ConversionError(f"RoPE scaling type {kind!r} in this GGUF is not supported")


def _llama3_rope_scaling(
    factors: np.ndarray, head_dim: int, theta: float
) -> dict[str, Any]:
    """Recover Llama 3.x rope_scaling from the rope_freqs tensor llama.cpp stores.

    The GGUF keeps only the per-frequency factors, so try Meta's published
    parameters with the largest factor and accept them only if they reproduce
    every stored value.
    """
    factor, low, high, old = float(factors.max()), 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < old / high,
        1.0,
        np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise ConversionError(
            "this GGUF's rope_freqs do not match Llama 3 RoPE scaling"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old,
    }


def _config_llama(meta: _Meta, tensors: _Tensors, raw: _Extras) -> dict[str, Any]:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
    }
    cfg.update(_base_config(meta, tensors))
    if "llama.attention.key_length" not in meta.md:
        # Older llama files state the head size only as the rotary dimension.
        cfg["head_dim"] = meta.integer("rope.dimension_count", cfg["head_dim"])
    cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
    cfg["mlp_bias"] = False
    cfg["rope_scaling"] = _rope_scaling(meta)
    if "rope_freqs.weight" in raw:
        cfg["rope_scaling"] = _llama3_rope_scaling(
            raw["rope_freqs.weight"](), cfg["head_dim"], cfg["rope_theta"]
        )
    return cfg


def _config_qwen2(meta: _Meta, tensors: _Tensors, raw: _Extras) -> dict[str, Any]:
    cfg = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
    }
    cfg.update(_base_config(meta, tensors))
    cfg["rope_scaling"] = _rope_scaling(meta)
    cfg["use_sliding_window"] = False
    return cfg


def _config_qwen3(meta: _Meta, tensors: _Tensors, raw: _Extras) -> dict[str, Any]:
    cfg = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_act": "silu",
    }
    cfg.update(_base_config(meta, tensors))
    cfg["rope_scaling"] = _rope_scaling(meta)
    cfg["attention_bias"] = False
    return cfg


def _swa_pattern(meta: _Meta) -> int:
    """llama.cpp hard-codes 6 for Gemma 3; newer files may store it, even per layer."""
    value = meta.get("attention.sliding_window_pattern", 6)
    if not isinstance(value, list):
        return int(value)
    # Per-layer flags (True = sliding): the period ends at the first global layer.
    period = value.index(False) + 1 if False in value else len(value) + 1
    if any(bool(v) != bool((i + 1) % period) for i, v in enumerate(value)):
        raise ConversionError("gemma3 sliding-window layer pattern is not periodic")
    return period


def _config_gemma3(meta: _Meta, tensors: _Tensors, raw: _Extras) -> dict[str, Any]:
    cfg = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
    }
    cfg.update(_base_config(meta, tensors))
    cfg["rope_theta"] = float(meta.get("rope.freq_base", 1_000_000.0))
    # llama.cpp scales queries by 1/sqrt(head_dim), except 27B (62 layers): 1/sqrt(d/heads).
    scalar = cfg["head_dim"]
    if cfg["num_hidden_layers"] == 62:
        scalar = cfg["hidden_size"] // cfg["num_attention_heads"]
    pattern = _swa_pattern(meta)
    cfg.update(
        query_pre_attn_scalar=scalar,
        rope_local_base_freq=float(meta.get("rope.freq_base_swa", 10_000.0)),
        sliding_window=meta.integer("attention.sliding_window", 512),
        sliding_window_pattern=pattern,
        layer_types=[
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(cfg["num_hidden_layers"])
        ],
        rope_scaling=_rope_scaling(meta),
        final_logit_softcapping=meta.get("final_logit_softcapping", None),
        attn_logit_softcapping=None,
    )
    return cfg


_CONFIGS = {
    "llama": _config_llama,
    "qwen2": _config_qwen2,
    "qwen3": _config_qwen3,
    "gemma3": _config_gemma3,
}


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# llama.cpp token types (llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pre_tokenizer(pre: str):
    """The split a gpt2-style vocabulary was trained with, named by `tokenizer.ggml.pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    def split(regex: str):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=False, use_regex=False
                ),
            ]
        )

    if pre in ("smollm", "starcoder"):
        # StarCoder-style: every digit on its own, then GPT-2's regex.
        return None, pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=True, use_regex=True
                ),
            ]
        )
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return normalizers.NFC(), split(_QWEN2_SPLIT)
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return None, split(_LLAMA3_SPLIT)
    if pre in ("default", "gpt-2", "gpt2"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ConversionError(
        f"GGUF pre-tokenizer {pre!r} is not supported"
        " (supported: smollm, starcoder, qwen2, llama-bpe, gpt-2, default)"
    )


def _gpt2_tokenizer(md: dict[str, Any], types: list[int]):
    """Byte-level BPE straight from the GGUF's tokens and merges."""
    from tokenizers import Tokenizer, decoders, models

    tokens = md["tokenizer.ggml.tokens"]
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == _NORMAL and not set(tok) <= spelled:
            # A few converters store a normal token as raw text: respell it in bytes.
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merges = []
    for m in md.get("tokenizer.ggml.merges", []):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ConversionError(
                f"GGUF merge {m!r} is not two tokens separated by one space"
            )
        merges.append((pair[0], pair[1]))
    pre = md.get("tokenizer.ggml.pre", "default")
    normalizer, pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"),
        )
    )
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(
    vocab: dict[str, int], priority: dict[str, float]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best merge first.

    SentencePiece-BPE merges the adjacent pair whose concatenation scores
    highest; listing every (left, right) split of every piece in score order
    reproduces that as a Hugging Face BPE (as transformers' generate_merges).
    """
    merges = []
    for piece, score in priority.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
    return [(a, b) for a, b, _ in merges]


def _spm_tokenizer(md: dict[str, Any], types: list[int], arch: str):
    """SentencePiece (BPE with byte fallback) from tokens and scores.

    Gemma files need two fixes (as transformers' GGUF loader found): runs of
    spaces are stored as real spaces instead of "▁", and the merge order is
    the token order, not the scores.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    gemma = arch.startswith("gemma")
    tokens = list(md["tokenizer.ggml.tokens"])
    if gemma:
        tokens = ["\u2581" * len(t) if t and set(t) == {" "} else t for t in tokens]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    mergeable = {t: i for t, i in vocab.items() if types[i] in (_NORMAL, _USER_DEFINED)}
    if gemma:
        priority = {t: -float(i) for t, i in mergeable.items()}
    else:
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise ConversionError(
                "SentencePiece GGUF vocabulary has no tokenizer.ggml.scores"
            )
        priority = {t: float(scores[i]) for t, i in mergeable.items()}
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_spm_merges(mergeable, priority),
            dropout=None,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581",
            prepend_scheme="first" if prefix else "never",
            split=False,
        )
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _token(md: dict[str, Any], key: str) -> str | None:
    token_id = md.get(f"tokenizer.ggml.{key}")
    tokens = md["tokenizer.ggml.tokens"]
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]


def _post_processor(md: dict[str, Any], byte_level: bool, add_bos: bool, add_eos: bool):
    """BOS/EOS insertion lives in tokenizer.json so every loader agrees on it."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    ends = {"bos": (add_bos, "bos_token_id"), "eos": (add_eos, "eos_token_id")}
    used = {k: _token(md, key) for k, (on, key) in ends.items() if on}
    used = {k: t for k, t in used.items() if t is not None}
    if used:
        head = [used["bos"]] if "bos" in used else []
        tail = [used["eos"]] if "eos" in used else []
        special = {t: md[f"tokenizer.ggml.{ends[k][1]}"] for k, t in used.items()}
        steps.append(
            processors.TemplateProcessing(
                single=[*head, "$A", *tail],
                pair=[*head, "$A", *tail, *head, "$B:1", *tail],
                special_tokens=list(special.items()),
            )
        )
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def build_tokenizer(metadata: dict[str, Any], arch: str):
    """A `tokenizers.Tokenizer` equivalent to the one the GGUF metadata describes."""
    from tokenizers import AddedToken

    model = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
        raise ConversionError(
            "this GGUF carries no tokenizer (no tokenizer.ggml.tokens)"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = list(metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if model == "gpt2":
        tok = _gpt2_tokenizer(metadata, types)
    elif model == "llama":
        tok = _spm_tokenizer(metadata, types, arch)
    else:
        raise ConversionError(
            f"GGUF tokenizer model {model!r} is not supported (supported: gpt2, llama)"
        )
    # Control tokens are special (skipped on decode); user-defined ones are matched
    # whole but kept in text; unused ones stay plain vocabulary entries.
    special = [i for i, k in enumerate(types) if k in (_CONTROL, _UNKNOWN)]
    user = [i for i, k in enumerate(types) if k == _USER_DEFINED]
    spelled = [(tok.id_to_token(i), True) for i in special]
    spelled += [(tok.id_to_token(i), False) for i in user]
    added = [
        AddedToken(t, special=s, normalized=False) for t, s in spelled if t is not None
    ]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    add_bos, add_eos = _add_bos_eos(metadata)
    tok.post_processor = _post_processor(metadata, model == "gpt2", add_bos, add_eos)
    return tok


def _add_bos_eos(md: dict[str, Any]) -> tuple[bool, bool]:
    # llama.cpp's defaults when the flag is absent: BOS for SentencePiece, not for BPE.
    add_bos = md.get(
        "tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama"
    )
    return bool(add_bos), bool(md.get("tokenizer.ggml.add_eos_token", False))


def tokenizer_files(
    metadata: dict[str, Any], arch: str, model_max_length: int
) -> dict[str, Any]:
    """tokenizer_config.json and special_tokens_map.json contents."""
    special_map = {
        name: tok
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
        if (tok := _token(metadata, key)) is not None
    }
    add_bos, add_eos = _add_bos_eos(metadata)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **special_map,
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


@dataclass
class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint."""

    tensors: dict[str, SourceTensor]  # HF names and (out, in) shapes; read() -> float32
    config: dict  # a config.json that mlx-lm's ModelArgs.from_dict understands
    metadata: dict = field(default_factory=dict, repr=False)  # raw GGUF key/values

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def write_tokenizer(self, out_dir: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        build_tokenizer(self.metadata, self.architecture).save(
            str(out_dir / "tokenizer.json")
        )
        files = tokenizer_files(
            self.metadata,
            self.architecture,
            self.config.get("max_position_embeddings", 4096),
        )
        for name, content in files.items():
            (out_dir / name).write_text(
                json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            )


def _special_ids(md: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids for config.json; an end-of-turn token also stops generation."""
    ids: dict[str, Any] = {}
    if (bos := md.get("tokenizer.ggml.bos_token_id")) is not None:
        ids["bos_token_id"] = int(bos)
    eos = md.get("tokenizer.ggml.eos_token_id")
    eot = md.get("tokenizer.ggml.eot_token_id")
    if eos is not None:
        ids["eos_token_id"] = int(eos) if eot in (None, eos) else [int(eos), int(eot)]
    if (pad := md.get("tokenizer.ggml.padding_token_id")) is not None:
        ids["pad_token_id"] = int(pad)
    return ids


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file's header; tensors are read one at a time on demand."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    metadata, infos = _parse_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"GGUF architecture {arch!r} is not supported"
            f" (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    _check_types(infos)
    meta = _Meta(metadata, arch)
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def reader(info: _TensorInfo, fix: Callable | None) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            w = _dequantize(info, data)
            return fix(w) if fix is not None else w

        return read

    tensors: dict[str, SourceTensor] = {}
    extras: dict[str, Callable[[], np.ndarray]] = {}
    for info in infos:
        if info.name in _NOT_WEIGHTS:
            extras[info.name] = reader(info, None)
            continue
        name = _hf_name(arch, info.name)
        dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
            info.type_name, info.type_name
        )
        tensors[name] = SourceTensor(
            name=name,
            shape=info.shape,
            dtype=dtype,
            read=reader(info, _fixer(arch, info.name, meta)),
            nbytes=info.nbytes,
        )
    if "model.embed_tokens.weight" not in tensors:
        raise ConversionError("GGUF has no token_embd.weight tensor")
    config = _CONFIGS[arch](meta, tensors, extras)
    config.update(_special_ids(metadata))
    return GGUFCheckpoint(tensors=tensors, config=config, metadata=metadata)
