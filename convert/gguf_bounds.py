"""Check a GGUF header's lengths and counts against the file before gguf parses it.

``gguf.GGUFReader`` believes the header. It loops once per declared key,
tensor and array element, keeping a numpy view (about a kilobyte) for each,
and slices every string to the length the file states, copying key and
tensor names out. So a single corrupt count or length, say a bit flip in
the element count of a token-type array, costs time and memory in proportion
to the whole file (hours and tens of gigabytes for a multi-gigabyte model)
before anything fails. The library has no limits to set, so this walk reads
only the lengths, counts and types, none of the values, and refuses a header
whose numbers do not fit the bytes that are there, before the library sees
the file. Along the way it names the tensor that runs past the end of a
truncated download; the library only reports a failed reshape.

What it accepts is what llama.cpp writes: versions 2 and 3, little-endian,
at most four dimensions per tensor.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from .errors import ConversionError

# All metadata array elements together. The largest real vocabularies (Gemma's
# 262k tokens: tokens, scores, types) need under 800k; gguf keeps ~1 KB per element.
MAX_ARRAY_ITEMS = 1 << 21
MAX_KEY_BYTES = 1 << 16
MAX_NAME_BYTES = 1 << 10
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DEPTH = 4  # arrays nested in arrays

_STRING, _ARRAY, _UINT32 = 8, 9, 4
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# type id -> (name, elements per block, bytes per block): gguf's GGML_QUANT_SIZES.
TypeTable = dict[int, tuple[str, int, int]]


def _cut(text: str, limit: int = 80) -> str:
    """A key or tensor name for a message: they can be kilobytes of garbage in a corrupt file."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Walk:
    """A cursor over the mapped file that fails, with the file's name, on any overrun."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf = buf
        self.path = path
        self.pos = 0
        self.items = 0

    def fail(self, problem: str) -> ConversionError:
        return ConversionError(f"{self.path} is a corrupt GGUF file: {problem}")

    def truncated(self, what: str) -> ConversionError:
        return ConversionError(f"{self.path} is truncated or corrupt: {what} runs past the end of the file")

    def take(self, n: int, what: str) -> int:
        """Skip n bytes; the offset they start at."""
        if n > len(self.buf) - self.pos:
            raise self.truncated(what)
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str, limit: int) -> str:
        n = self.u64(what)
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes (at most {limit} are allowed)")
        start = self.take(n, what)
        return bytes(self.buf[start : start + n]).decode("utf-8", "replace")

    def room(self, count: int, size: int, what: str) -> None:
        """A declared count of items of at least ``size`` bytes each must fit in what is left."""
        if count * size > len(self.buf) - self.pos:
            raise self.fail(f"{what} claims {count} items, more than the file holds")

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == _STRING:
            self.take(self.u64(what), what)
        elif vtype == _ARRAY:
            self.array(what, depth)
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise self.fail(f"{what} nests arrays more than {MAX_DEPTH} deep")
        etype, count = self.u32(what), self.u64(what)
        if etype not in _SCALAR_BYTES and etype not in (_STRING, _ARRAY):
            raise self.fail(f"{what} is an array of unknown value type {etype}")
        size = _SCALAR_BYTES.get(etype, 8 if etype == _STRING else 12)  # 12: type and count
        self.room(count, size, what)
        self.items += count
        if self.items > MAX_ARRAY_ITEMS:
            raise self.fail(f"its metadata arrays hold more than {MAX_ARRAY_ITEMS} items in all")
        if etype in _SCALAR_BYTES:
            self.take(count * size, what)
        elif etype == _STRING:
            self.strings(count, what)
        else:
            for _ in range(count):
                self.value(etype, what, depth + 1)

    def strings(self, count: int, what: str) -> None:
        """Skip ``count`` strings: the hot loop for token lists, kept free of calls."""
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise self.truncated(what)
            pos += 8 + unpack(buf, pos)[0]
            if pos > end:
                raise self.truncated(what)
        self.pos = pos


def _header(walk: _Walk) -> tuple[int, int]:
    """Magic and version; the tensor and key counts."""
    if bytes(walk.buf[:4]) != b"GGUF":
        raise ConversionError(f"{walk.path} is not a GGUF file (bad magic)")
    walk.pos = 4
    version = walk.u32("the version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        kind = "a big-endian GGUF file, which is not supported" if swapped in (2, 3) else f"GGUF version {version}"
        raise ConversionError(f"{walk.path} is {kind} (versions 2 and 3, little-endian, are supported)")
    n_tensors, n_kv = walk.u64("the tensor count"), walk.u64("the key count")
    walk.room(n_kv, 13, "the header")  # key length, type, a one-byte value
    walk.room(n_tensors, 24, "the tensor table")  # name length, dims, type, offset
    return n_tensors, n_kv


def _metadata(walk: _Walk, n_kv: int) -> int:
    """Skip every key/value pair; the alignment the file asks for."""
    alignment = 32
    for i in range(n_kv):
        key = walk.string(f"metadata key {i}", MAX_KEY_BYTES)
        vtype = walk.u32(f"the type of {_cut(key)}")
        start = walk.pos
        walk.value(vtype, f"the value of {_cut(key)}")
        if key == "general.alignment":
            if vtype != _UINT32:
                raise walk.fail("general.alignment is not a uint32")
            alignment = _U32.unpack_from(walk.buf, start)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise walk.fail(f"general.alignment {alignment} is not a power of two")
    return alignment


def _tensor_info(walk: _Walk, i: int, types: TypeTable) -> tuple[str, list[int], int, int]:
    name = _cut(walk.string(f"the name of tensor {i}", MAX_NAME_BYTES))  # only for messages
    n_dims = walk.u32(f"the dimension count of tensor {name}")
    if n_dims > MAX_DIMS:
        raise walk.fail(f"tensor {name} claims {n_dims} dimensions (at most {MAX_DIMS})")
    dims = [walk.u64(f"the shape of tensor {name}") for _ in range(n_dims)]
    type_id = walk.u32(f"the type of tensor {name}")
    if type_id not in types:
        raise ConversionError(f"{walk.path}: tensor {name} has unknown GGML type {type_id}")
    return name, dims, type_id, walk.u64(f"the offset of tensor {name}")


def _tensor_bytes(path: Path, name: str, dims: list[int], type_name: str, block: int, size: int) -> int:
    """Bytes of one tensor; dims in GGUF order (row length first)."""
    if 0 in dims:
        raise ConversionError(f"{path}: tensor {name} has a zero-length dimension")
    cols = dims[0] if dims else 1
    if cols % block:
        raise ConversionError(
            f"{path}: tensor {name}: row length {cols} is not a multiple of the {type_name} block size {block}"
        )
    return math.prod(dims[1:]) * (cols // block) * size


def check_header(path: Path, types: TypeTable) -> None:
    """Raise ConversionError unless every length, count and tensor extent fits the file."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ConversionError(f"{path} is empty, not a GGUF file") from None
    with buf:
        walk = _Walk(buf, path)
        n_tensors, n_kv = _header(walk)
        alignment = _metadata(walk, n_kv)
        table = [_tensor_info(walk, i, types) for i in range(n_tensors)]
        data_start = -(-walk.pos // alignment) * alignment
        for name, dims, type_id, offset in table:
            type_name, block, size = types[type_id]
            nbytes = _tensor_bytes(path, name, dims, type_name, block, size)
            if data_start + offset + nbytes > len(buf):
                raise ConversionError(f"{path} is truncated: tensor {name} runs past the end")
