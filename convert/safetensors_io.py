"""Safetensors without loading whole files: a lazy reader and a streaming writer.

The reader parses the JSON header and memory-maps tensor data on demand, so a
shard is never read in full. The header is untrusted JSON: each entry's
dtype, shape and offsets are checked against each other and against the file
before the tensor is indexed, so ``read()`` can only fail on I/O. The writer lays out the header first (every
name, dtype and shape is known before any data is converted) and then writes
each tensor, or each slice of a tensor, at its final offset. That lets the
converter produce one FFN bank tensor layer by layer with peak memory of about
one layer.
"""

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from ..model.safetensors_header import read_header
from .errors import ConversionError
from .tensors import SourceTensor, bf16_to_float32

NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U32": np.uint32,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32"}


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _entry(path: Path, name: str, info) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry, checked: (dtype, shape, begin, end); the header is untrusted JSON."""
    if not isinstance(info, dict):
        raise ConversionError(f"{path}: tensor {name} has a malformed header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {str(dtype)[:20]}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ConversionError(f"{path}: tensor {name} has a malformed shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ConversionError(f"{path}: tensor {name} has malformed data_offsets")
    begin, end = offsets
    needed = math.prod(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
    # More bytes than the span would read into the next tensor or past the end. Fewer is
    # only wasteful, and left for the converter's shape checks to name.
    if begin > end or needed > end - begin:
        raise ConversionError(
            f"{path}: tensor {name}: data_offsets span {end - begin} bytes, its shape needs {needed}"
        )
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | Path) -> dict[str, SourceTensor]:
    """Lazily read every tensor of one safetensors file."""
    path = Path(path)
    header, start = read_header(path, ConversionError)
    size = path.stat().st_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, info)
        if start + end > size:
            raise ConversionError(
                f"{path}: truncated: tensor {name} needs {start + end} bytes, the file has {size}"
            )
        tensors[name] = SourceTensor(
            name=name,
            shape=shape,
            dtype=DTYPE_NAMES.get(dtype, dtype.lower()),
            read=_memmap_reader(path, start + begin, dtype, shape),
            nbytes=end - begin,
        )
    return tensors


def _memmap_reader(path: Path, offset: int, dtype: str, shape: tuple[int, ...]):
    def read() -> np.ndarray:
        count = math.prod(shape)
        data = np.memmap(path, dtype=NUMPY_DTYPES[dtype], mode="r", offset=offset, shape=(count,))
        array = np.array(data).reshape(shape)
        return bf16_to_float32(array) if dtype == "BF16" else array

    return read


class SafetensorsWriter:
    """Write a safetensors file whose entries are declared up front.

    ``entries`` is an ordered iterable of (name, dtype, shape) where dtype is a
    key of SAFETENSORS_DTYPES. Data goes in with ``write(name, array, offset)``
    where offset (in elements along axis 0 of the tensor) allows a tensor to be
    written slice by slice. ``close`` checks every byte was written.
    """

    def __init__(self, path: Path, entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = path
        self.layout: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        header: dict = {"__metadata__": metadata or {"format": "mlx"}}
        cursor = 0
        for name, dtype, shape in entries:
            nbytes = int(np.prod(shape)) * np.dtype(_storage_dtype(dtype)).itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
            self.layout[name] = (cursor, nbytes, tuple(shape))
            cursor += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.remaining = {name: nbytes for name, (_, nbytes, _) in self.layout.items()}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.data_start + cursor)

    def write(self, name: str, array: np.ndarray, row: int = 0) -> None:
        """Write ``array`` into tensor ``name`` starting at index ``row`` of axis 0."""
        begin, nbytes, shape = self.layout[name]
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        data = np.ascontiguousarray(array).tobytes()
        if row * row_bytes + len(data) > nbytes:
            raise ValueError(f"write past the end of {name}")
        self.file.seek(self.data_start + begin + row * row_bytes)
        self.file.write(data)
        self.remaining[name] -= len(data)

    def close(self) -> None:
        self.file.close()
        missing = [name for name, left in self.remaining.items() if left != 0]
        if missing:
            raise ValueError(f"{self.path}: tensors not fully written: {', '.join(missing[:5])}")

    def abort(self) -> None:
        self.file.close()


def _storage_dtype(dtype: str):
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
