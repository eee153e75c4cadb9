"""The GGUF container through the gguf package: metadata, tensor table, decoding.

``gguf.GGUFReader`` parses the file and memory-maps it, so tensor bytes are
only touched when a tensor is read, and ``gguf.quants.dequantize`` decodes
every block format it knows. What stays here, and why:

- ``gguf_bounds.check_header`` runs first, because the library trusts the
  header's counts and lengths (see that module).
- Whatever the library raises on a bad file (ValueError, KeyError,
  IndexError, UnicodeDecodeError, ...) becomes one ConversionError that names
  the file.
- Metadata values become plain Python once. The library keeps a numpy view
  per array element, about a kilobyte each, so the reader itself is dropped
  after opening rather than kept alive for a 150k-token vocabulary. Float32
  scalars become their shortest decimal (1e-05, not 9.99999974e-06) and bad
  UTF-8 in a value is replaced, not fatal.
- A tensor decodes in row chunks into one float32 array, so the peak stays
  near one tensor. The integer and F64 types are a numpy cast, because
  gguf.quants does not decode them.
- A type the library lists but cannot decode is refused when the file is
  opened, not halfway through a conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError
from .gguf_bounds import TypeTable, check_header
from .gguf_meta import one_line

_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_CAST = {"I8", "I16", "I32", "I64", "F64"}  # gguf.quants.dequantize has no decoder for these
_CHUNK_ELEMENTS = 1 << 22  # ~16 MB of float32 per decoded chunk


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF's dims reversed
    type_name: str  # "F32", "Q4_0", ...
    nbytes: int
    data: np.ndarray  # the mapped bytes (typed for F16/F32/I*), as gguf laid them out
    qtype: Any  # gguf.GGMLQuantizationType


def _gguf_package(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise ConversionError(f"{path}: reading GGUF needs the gguf package: pip install gguf") from None
    return gguf


def _type_table(gguf: Any) -> TypeTable:
    return {int(t): (t.name, block, size) for t, (block, size) in gguf.GGML_QUANT_SIZES.items()}


def open_gguf(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """Metadata and tensor table of a GGUF file; no tensor data is read."""
    gguf = _gguf_package(path)
    check_header(path, _type_table(gguf))
    try:
        reader = gguf.GGUFReader(path)
        metadata = _metadata(reader)
        tensors = [_tensor(path, t, gguf) for t in reader.tensors]
    except ConversionError:
        raise
    except Exception as e:  # the library on a file check_header let through
        raise ConversionError(f"{path} is a corrupt GGUF file ({one_line(e)})") from None
    _check_decodable(path, tensors)
    return metadata, tensors


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


def _metadata(reader: Any) -> dict[str, Any]:
    """Key -> plain Python value; the reader's first three fields are the header's own."""
    return {field.name: _field_value(field.parts) for field in list(reader.fields.values())[3:]}


def _field_value(parts: list[np.ndarray]) -> Any:
    # A key/value field's parts: key length, key bytes, value type, then the value's parts.
    value, _ = _value(parts, 3, int(parts[2][0]))
    return value


def _f32(value: float) -> float:
    """The shortest decimal that round-trips a float32 (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _value(parts: list[np.ndarray], i: int, vtype: int) -> tuple[Any, int]:
    """Decode the value whose parts start at ``i``; also the index just past them."""
    if vtype == _STRING:
        # parts: length, bytes
        return bytes(parts[i + 1]).decode("utf-8", errors="replace"), i + 2
    if vtype == _ARRAY:
        # parts: element type, count, then each element's parts
        etype, count = int(parts[i][0]), int(parts[i + 1][0])
        i += 2
        if etype not in (_STRING, _ARRAY):
            items = parts[i : i + count]
            return (np.concatenate(items).tolist() if count else []), i + count
        values = []
        for _ in range(count):
            value, i = _value(parts, i, etype)
            values.append(value)
        return values, i
    value = parts[i][0].item()
    return (_f32(value) if vtype == _FLOAT32 else value), i + 1


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


def _tensor(path: Path, t: Any, gguf: Any) -> GGUFTensor:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    cols = shape[-1] if shape else 1
    nbytes = math.prod(shape[:-1]) * (cols // block) * size
    if t.data.nbytes != nbytes:  # check_header's sums in Python ints, the library's in uint64
        raise ConversionError(f"{path}: tensor {t.name} has an impossible shape {shape}")
    return GGUFTensor(t.name, shape, t.tensor_type.name, nbytes, t.data, t.tensor_type)


def _can_decode(qtype: Any, type_bytes: int) -> bool:
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, type_bytes), np.uint8), qtype)
    except Exception:  # NotImplementedError, or anything else: the type is unusable
        return False
    return True


def _check_decodable(path: Path, tensors: list[GGUFTensor]) -> None:
    """Fail before conversion starts, not halfway through it."""
    from gguf import GGML_QUANT_SIZES

    known: dict[str, bool] = {}
    for t in tensors:
        if t.type_name in _CAST:
            continue
        if t.type_name not in known:
            known[t.type_name] = _can_decode(t.qtype, GGML_QUANT_SIZES[t.qtype][1])
        if not known[t.type_name]:
            raise ConversionError(f"{path}: tensor {t.name} is {t.type_name}, which the gguf package cannot decode")


def _decode(t: GGUFTensor, chunk: np.ndarray) -> np.ndarray:
    if t.type_name in _CAST:
        return chunk.astype(np.float32)
    from gguf.quants import dequantize

    return dequantize(np.ascontiguousarray(chunk), t.qtype)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """One tensor as float32 in numpy order, decoded in row chunks to bound peak memory."""
    cols = t.shape[-1] if t.shape else 1
    rows = math.prod(t.shape[:-1])
    raw = t.data.reshape(rows, -1)
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        out[r : r + step] = _decode(t, raw[r : r + step]).reshape(-1, cols)
    return out.reshape(t.shape)
