"""Read PyTorch checkpoints (``.bin``/``.pt``/``.pth``) without torch and without
running pickle code.

A torch file is a pickle whose tensors point, through persistent ids, at raw
storages kept next to it: zip members ``<archive>/data/<key>`` (torch >= 1.6) or
length-prefixed records after the pickle (the legacy format). Unpickling with
``pickle.load`` would run whatever callables the file names, so the unpickler
here resolves only an allowlist of globals, each to a small placeholder of our
own; anything else is refused before it can be called.

The unpickler is Python's pure-Python one, not the C accelerator: the C
version grows its memo table to whatever index a PUT opcode names, so four
hostile bytes (a memo index of 2**32) cost tens of gigabytes, whereas the
Python one keeps the memo in a dict. Placeholders refuse BUILD (attribute
setting), so a pickle cannot alter a tensor after its layout was checked.

Only the pickle is parsed up front. Each ``SourceTensor.read()`` seeks to its
own bytes, so converting a checkpoint keeps peak memory near one tensor.

Nested dicts (``{"state_dict": {...}}``, ``{"model": {...}, "epoch": 3}``) are
flattened with ``.`` joining the keys (``model.layer.weight``): that loses
nothing and guesses nothing, and name mapping can strip a wrapper prefix.
Non-tensor values (ints, strings, lists) are skipped. A pickle can build
cycles and shared sub-dicts, so the walk is bounded in depth, in nodes
visited and in name length.
"""

import io
import math
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from .errors import ConversionError
from .tensors import SourceTensor, bf16_to_float32

# The first pickle of a legacy file; torch.serialization.MAGIC_NUMBER.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
ZIP_LOCAL_MAGIC = b"PK\x03\x04"

# Bounds on what an untrusted pickle may make the reader do (real checkpoints
# nest a few levels, hold thousands of entries and pickle to a few megabytes).
MAX_DEPTH = 64
MAX_NODES = 1 << 18
MAX_NAME = 4096
MAX_PICKLE_BYTES = 256 << 20

# Element dtypes we can hand to numpy; bfloat16 travels as uint16 bit patterns.
_NUMPY_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
}

# torch.<Name>Storage -> element dtype (what torch writes for typed storages).
_TYPED_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

# Other torch dtypes and storages (complex, float8, quantized): real tensors,
# but nothing numpy holds as is, so they get "unsupported dtype", not "refusing".
_OTHER_DTYPE = re.compile(r"\w*Storage|(float|complex|u?int|quint|qint|bits)\d\w*")


def _itemsize(dtype: str) -> int:
    return np.dtype(_NUMPY_DTYPES[dtype]).itemsize


def _error(path: Path, message: str) -> ConversionError:
    """Build the one-line error the CLI prints, whatever the pickle put in it."""
    text = f"{path}: {message}"
    return ConversionError(text.replace("\r", "\\r").replace("\n", "\\n"))


class _NoBuild:
    """Placeholders are built by our own functions only; pickle's BUILD would bypass their checks."""

    def __setstate__(self, state: Any) -> None:
        raise ValueError("the pickle sets attributes on a tensor placeholder")


@dataclass(frozen=True)
class _Dtype(_NoBuild):
    """Stands in for a storage class or a ``torch.<dtype>`` global."""

    name: str  # a key of _NUMPY_DTYPES


@dataclass
class _Storage(_NoBuild):
    """One storage's bytes in the file; legacy offsets are filled in after the pickle."""

    key: str
    dtype: str
    view_offset: int = 0  # bytes into the record (legacy storage views)
    view_nbytes: int | None = None  # legacy storage views only
    file_offset: int = -1
    nbytes: int = 0


@dataclass(frozen=True)
class _Tensor(_NoBuild):
    """A strided view into a storage, in elements of ``dtype``."""

    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def span(self) -> int:
        """Elements from the first to one past the last one the view touches."""
        if 0 in self.shape:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


def _rebuild_tensor(storage, storage_offset, size, stride) -> _Tensor:
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> _Tensor:
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
) -> _Tensor:
    """torch writes v3 (untyped storage + dtype) for dtypes with no typed storage class."""
    if not isinstance(dtype, _Dtype):
        raise TypeError("_rebuild_tensor_v3 got no dtype")
    return _make_tensor(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _Tensor:
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state) -> _Tensor:
    return data


def _check_layout(*values: Any) -> None:
    """Offsets, sizes and strides come from untrusted data: non-negative ints only."""
    if not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"bad tensor layout {values}")


def _make_tensor(storage, offset, shape, stride, dtype: str | None = None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise TypeError("tensor rebuilt from something that is not a storage")
    shape, stride = tuple(shape), tuple(stride)
    if len(shape) != len(stride):
        raise ValueError(f"shape {shape} and stride {stride} differ in length")
    _check_layout(offset, *shape, *stride)
    return _Tensor(storage, dtype or storage.dtype, offset, shape, stride)


_REBUILDERS: dict[tuple[str, str], Callable[..., _Tensor]] = {
    ("torch._utils", f.__name__): f
    for f in (
        _rebuild_tensor,
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_parameter,
        _rebuild_parameter_with_state,
    )
}


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: see the module docstring
    """An unpickler that can only build dicts, lists, scalars and tensor placeholders."""

    def __init__(self, file: BinaryIO, path: Path, load_storage: Callable[[tuple], _Storage]):
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILDERS:
            return _REBUILDERS[(module, name)]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _Dtype("uint8")  # untyped storages count bytes
        if module == "torch" and name in _TYPED_STORAGES:
            return _Dtype(_TYPED_STORAGES[name])
        if module == "torch" and name in _NUMPY_DTYPES:
            return _Dtype(name)
        if module == "torch" and _OTHER_DTYPE.fullmatch(name):
            raise _error(self._path, f"unsupported dtype torch.{name}")
        raise _error(
            self._path,
            f"refusing to load: the pickle calls {module}.{name}, which is not a tensor",
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid or _text(pid[0]) != "storage":
            raise _error(self._path, f"unsupported persistent id {str(pid)[:60]}")
        return self._load_storage(pid)


def _text(value: Any) -> str:
    """Persistent ids hold str, or bytes when written by Python 2."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _unpickle(file: BinaryIO, path: Path, load_storage: Callable[[tuple], _Storage]) -> Any:
    """Run the restricted unpickler; any failure becomes a one-line ConversionError."""
    try:
        return _RestrictedUnpickler(file, path, load_storage).load()
    except ConversionError:
        raise
    except Exception as e:  # untrusted input can make pickle raise almost anything
        message = f"corrupt or truncated torch pickle ({_describe(e)})"
        raise _error(path, message) from None


def _describe(e: Exception) -> str:
    """An exception in a few words; its text may hold pickled values (even ones str() rejects)."""
    try:
        detail = " ".join(str(e).split())
    except Exception:
        detail = ""
    return f"{type(e).__name__}: {detail[:200]}"


def _storage_type(path: Path, pid: tuple) -> str:
    if not isinstance(pid[1], _Dtype):
        raise _error(path, "persistent id names no storage type")
    return pid[1].name


def _member_data_offset(f: BinaryIO, path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, whose extra
    field (torch pads it for alignment) may differ from the central directory's."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != ZIP_LOCAL_MAGIC:
        raise _error(path, f"bad zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _zip_prefix(path: Path, names: list[str]) -> str:
    """torch nests everything under one archive folder, whatever its name."""
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise _error(path, "zip file is not a torch checkpoint (no single <archive>/data.pkl)")
    return pickles[0][: -len("data.pkl")]


def _zip_member(zf: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo) -> bytes:
    if info.file_size > MAX_PICKLE_BYTES:  # the declared size; deflate could inflate to it
        raise _error(path, f"zip member {info.filename} claims {info.file_size} bytes")
    try:
        return zf.read(info)
    except Exception as e:  # zipfile on a hostile archive: BadZipFile, zlib.error, NotImplementedError, ...
        raise _error(path, f"corrupt zip member {info.filename} ({_describe(e)})") from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, but also NotImplementedError, struct.error, ...
        raise _error(path, f"corrupt or truncated zip ({_describe(e)})") from None


def _read_zip(path: Path) -> tuple[Any, str]:
    """Unpickle ``data.pkl``; each storage is its uncompressed member's bytes in place."""
    zf = _open_zip(path)
    size = path.stat().st_size
    with zf, open(path, "rb") as f:
        infos = {i.filename: i for i in zf.infolist()}
        prefix = _zip_prefix(path, list(infos))
        order = "<"
        if prefix + "byteorder" in infos:
            order = ">" if _zip_member(zf, path, infos[prefix + "byteorder"]).strip() == b"big" else "<"
        storages: dict[str, _Storage] = {}

        def load_storage(pid: tuple) -> _Storage:
            if len(pid) != 5:
                raise _error(path, f"unexpected storage id of length {len(pid)}")
            dtype, key = _storage_type(path, pid), _text(pid[2])
            if key not in storages:
                info = infos.get(f"{prefix}data/{key}")
                if info is None:
                    raise _error(path, f"missing storage record data/{key}")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise _error(path, f"storage data/{key} is compressed (torch never does that)")
                offset = _member_data_offset(f, path, info)
                if offset + info.file_size > size:
                    raise _error(path, f"truncated file: storage data/{key} runs past the end")
                storages[key] = _Storage(key, dtype, file_offset=offset, nbytes=info.file_size)
            return storages[key]

        obj = _unpickle(io.BytesIO(_zip_member(zf, path, infos[prefix + "data.pkl"])), path, load_storage)
    return obj, order


def _no_storage(pid: tuple) -> _Storage:
    raise ValueError("persistent id outside the main pickle")


def _read_legacy(path: Path) -> tuple[Any, str]:
    """Pre-1.6 layout: magic, protocol, sys_info, main pickle, storage keys, records."""
    with open(path, "rb") as f:
        if _unpickle(f, path, _no_storage) != LEGACY_MAGIC:
            raise _error(path, "not a torch file (pickle without the torch magic number)")
        _unpickle(f, path, _no_storage)  # protocol version
        sys_info = _unpickle(f, path, _no_storage)
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        order = "<" if little else ">"
        storages: list[_Storage] = []

        def load_storage(pid: tuple) -> _Storage:
            if len(pid) != 6:
                raise _error(path, f"unexpected storage id of length {len(pid)}")
            storage = _Storage(_text(pid[2]), _storage_type(path, pid))
            if pid[5] is not None:  # (view_key, offset, size) in elements
                _, start, size = pid[5]
                _check_layout(start, size)
                itemsize = _itemsize(storage.dtype)
                storage.view_offset, storage.view_nbytes = start * itemsize, size * itemsize
            storages.append(storage)
            return storage

        obj = _unpickle(f, path, load_storage)
        keys = _unpickle(f, path, _no_storage)
        if not isinstance(keys, list):
            raise _error(path, "corrupt legacy torch file (no storage key list)")
        records = _scan_legacy_records(f, path, [_text(k) for k in keys], storages, order)
    for storage in storages:
        _place_legacy_storage(path, storage, records)
    return obj, order


def _scan_legacy_records(
    f: BinaryIO, path: Path, keys: list[str], storages: list[_Storage], order: str
) -> dict[str, tuple[int, int]]:
    """Walk the records (an element count, then raw bytes) -> key: (offset, nbytes).

    The count is in elements of the storage's dtype, so the records can only be
    walked once the pickle has told us every storage's type.
    """
    itemsizes = {s.key: _itemsize(s.dtype) for s in storages}
    end = os.fstat(f.fileno()).st_size
    pos = f.tell()
    records = {}
    for key in keys:
        if key not in itemsizes:
            raise _error(path, f"storage record {key} belongs to no tensor")
        f.seek(pos)
        head = f.read(8)
        nbytes = int.from_bytes(head, "little" if order == "<" else "big") * itemsizes[key]
        if len(head) < 8 or pos + 8 + nbytes > end:
            raise _error(path, f"truncated file: storage record {key} is cut short")
        records[key] = (pos + 8, nbytes)
        pos += 8 + nbytes
    return records


def _place_legacy_storage(
    path: Path, storage: _Storage, records: dict[str, tuple[int, int]]
) -> None:
    """Point a storage (or a legacy view of one) at its record's bytes."""
    if storage.key not in records:
        raise _error(path, f"missing storage record {storage.key}")
    offset, nbytes = records[storage.key]
    view_nbytes = nbytes if storage.view_nbytes is None else storage.view_nbytes
    if storage.view_offset + view_nbytes > nbytes:
        raise _error(path, f"storage view past the end of record {storage.key}")
    storage.file_offset = offset + storage.view_offset
    storage.nbytes = view_nbytes


def _key_text(path: Path, key: Any) -> str:
    try:
        return str(key)
    except (ValueError, RecursionError):  # an int past str()'s digit limit, a deeply nested tuple
        raise _error(path, "a dict key cannot be printed as a name") from None


def _collect(path: Path, obj: dict) -> dict[str, _Tensor]:
    """Flatten nested dicts into dotted names, skipping everything that is not a tensor.

    Iterative and bounded: the pickle may hold cycles, or a sub-dict shared at
    every level (2**depth paths to walk).
    """
    out: dict[str, _Tensor] = {}
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    visited = 0
    while stack:
        prefix, node, depth = stack.pop()
        if isinstance(node, _Tensor):
            if prefix in out:
                raise _error(path, f"two tensors flatten to the same name {prefix[:200]!r}")
            out[prefix] = node
            continue
        if depth >= MAX_DEPTH:
            raise _error(path, f"the checkpoint nests dicts more than {MAX_DEPTH} deep (a cycle?)")
        visited += len(node)
        if visited > MAX_NODES:
            raise _error(path, f"the checkpoint's dicts hold more than {MAX_NODES} entries")
        for key, value in reversed(list(node.items())):  # reversed: popped in file order
            if isinstance(value, (dict, _Tensor)):
                text = key if type(key) is str else _key_text(path, key)
                name = f"{prefix}.{text}" if prefix else text
                if len(name) > MAX_NAME:
                    raise _error(path, f"a tensor name is longer than {MAX_NAME} characters")
                stack.append((name, value, depth + 1))
    return out


def _read_view(path: Path, tensor: _Tensor, order: str) -> np.ndarray:
    """Read only the bytes the view spans, then apply its strides."""
    dtype = np.dtype(_NUMPY_DTYPES[tensor.dtype]).newbyteorder(order)
    buf = bytearray(tensor.span * tensor.itemsize)
    try:
        with open(path, "rb") as f:
            f.seek(tensor.storage.file_offset + tensor.offset * tensor.itemsize)
            complete = f.readinto(buf) == len(buf)
    except OSError as e:
        raise _error(path, f"cannot read tensor data ({e.strerror})") from None
    if not complete:
        raise _error(path, "truncated file: tensor data is cut short")
    flat = np.frombuffer(buf, dtype=dtype)
    strides = tuple(s * tensor.itemsize for s in tensor.stride)
    view = np.lib.stride_tricks.as_strided(flat, tensor.shape, strides)
    array = np.asarray(view, dtype=dtype.newbyteorder("="), order="C")  # keeps 0-d
    return bf16_to_float32(array) if tensor.dtype == "bfloat16" else array


def _source_tensor(path: Path, name: str, tensor: _Tensor, order: str) -> SourceTensor:
    """Check the view stays inside its storage now, so read() can only fail on I/O."""
    if (tensor.offset + tensor.span) * tensor.itemsize > tensor.storage.nbytes:
        raise _error(path, f"tensor {name} reaches past the end of its storage (truncated file?)")
    return SourceTensor(
        name=name,
        shape=tensor.shape,
        dtype=tensor.dtype,
        read=lambda: _read_view(path, tensor, order),
        nbytes=math.prod(tensor.shape) * tensor.itemsize,
    )


def read_torch(path: str | Path) -> dict[str, SourceTensor]:
    """Index a torch checkpoint (zip or legacy) as name -> lazily read SourceTensor."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise _error(path, f"cannot read file ({e.strerror})") from None
    if head == ZIP_LOCAL_MAGIC:
        obj, order = _read_zip(path)
    elif head[:1] == pickle.PROTO:
        obj, order = _read_legacy(path)
    else:
        raise _error(path, "not a PyTorch checkpoint (neither a torch zip nor a torch pickle)")
    if not isinstance(obj, dict):
        raise _error(path, f"expected a dict of tensors at the top, found {type(obj).__name__}")
    tensors = _collect(path, obj)
    if not tensors:
        raise _error(path, "the checkpoint holds no tensors")
    return {name: _source_tensor(path, name, t, order) for name, t in tensors.items()}
