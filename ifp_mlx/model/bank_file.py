"""The FFN bank read from disk a few records at a time (``--low-memory``).

``mx.load`` is lazy but not a memory map: touching a tensor reads all of it. A
numpy memory map would count every page it touched in the process's resident
memory for as long as it stays mapped. So the bank file is read with plain
positioned reads (``os.preadv``) straight into the destination buffers: one
read per run of adjacent selected channels (a channel's gate row, up row and
down column are one contiguous record), and nothing of the file stays resident
after the read. ``BankFile`` counts the bytes it reads and the time it takes.
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import IFPError
from .bank import Bank, CompactFFN
from .safetensors_header import read_header

# safetensors dtype -> (numpy storage dtype, mlx dtype); bfloat16 travels as uint16 bits.
DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
}
TENSORS = ("bank.weight", "bank.scales", "bank.biases")
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


@dataclass
class _Tensor:
    offset: int  # of element [0, 0, 0, 0] in the file
    shape: tuple[int, ...]  # [L, d_ff, 3, X]
    storage: type
    dtype: mx.Dtype

    @property
    def record_bytes(self) -> int:
        """Bytes of one channel record (its three rows)."""
        return 3 * self.shape[3] * np.dtype(self.storage).itemsize

    def channel_offset(self, layer: int, channel: int) -> int:
        return self.offset + (layer * self.shape[1] + channel) * self.record_bytes


@dataclass
class ReadStats:
    """What the disk reads cost: the statistics line reports these."""

    bytes: int = 0
    seconds: float = 0.0
    reads: int = 0

    def add(self, other: "ReadStats") -> None:
        self.bytes, self.seconds, self.reads = self.bytes + other.bytes, self.seconds + other.seconds, self.reads + other.reads


@dataclass
class BankFile:
    """An FFN bank file, opened for positioned reads; its header is read once."""

    path: Path
    bits: Optional[int] = None
    group_size: Optional[int] = None
    tensors: dict[str, _Tensor] = field(default_factory=dict)
    stats: ReadStats = field(default_factory=ReadStats)  # every read since opening

    @classmethod
    def open(cls, path: Path, bits: Optional[int] = None, group_size: Optional[int] = None) -> "BankFile":
        bank = cls(Path(path), bits, group_size)
        bank.tensors = _read_header(bank.path, TENSORS if bits else TENSORS[:1])
        return bank

    @property
    def num_layers(self) -> int:
        return self.tensors["bank.weight"].shape[0]

    @property
    def d_ff(self) -> int:
        return self.tensors["bank.weight"].shape[1]

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def nbytes(self) -> int:
        return sum(t.record_bytes * t.shape[0] * t.shape[1] for t in self.tensors.values())

    def layer(self, layer: int) -> Bank:
        """One layer's records ``[1, d_ff, 3, X]`` as a Bank (read from disk now)."""
        channels = np.arange(self.d_ff)
        arrays = [mx.array(self._read_records(t, layer, channels))[None] for t in self._parts()]
        return Bank(*arrays, bits=self.bits, group_size=self.group_size) if self.quantized else Bank(arrays[0])

    def gather(self, indices: mx.array) -> tuple[CompactFFN, ReadStats]:
        """The compact FFN of checked ``indices [L, k]``, one array per layer, read from disk.

        Per-layer arrays (not one stacked ``[L, 2k, W]``) so that no layer is
        held twice: each is read into its final layout and handed to MLX.
        """
        before = ReadStats(self.stats.bytes, self.stats.seconds, self.stats.reads)
        rows = np.array(indices).astype(np.int64)
        fields = [list(f) for f in zip(*(self._read_channels(layer, channels) for layer, channels in enumerate(rows)))]
        spent = ReadStats(self.stats.bytes - before.bytes, self.stats.seconds - before.seconds, self.stats.reads - before.reads)
        return self._compact(fields), spent

    def dense_layer(self, layer: int) -> CompactFFN:
        """Every channel of one layer, ``[1, ...]`` arrays, read from disk now."""
        return self._compact([f[None] for f in self._read_channels(layer, np.arange(self.d_ff))])

    def _compact(self, fields: list) -> CompactFFN:
        if self.quantized:
            return CompactFFN(*fields, bits=self.bits, group_size=self.group_size)
        return CompactFFN(*fields)

    def _parts(self) -> list[_Tensor]:
        return [self.tensors[name] for name in TENSORS if name in self.tensors]

    def _read_channels(self, layer: int, channels: np.ndarray) -> list[mx.array]:
        """One layer's compact fields (gate_up, down_t[, their scales and biases]) of
        ascending ``channels``, each record's rows read straight into place.

        A scattered read (one iovec per row) rather than records then a copy:
        no ``[k, 3, X]`` buffer, no concatenation, so the transient memory of a
        read is the layer's own size once, and the allocator is left nothing
        to fragment (48 MB of RSS above MLX's live arrays for SmolLM2 before).
        """
        fields: list[Optional[mx.array]] = [None] * (6 if self.quantized else 2)
        k = len(channels)
        for slot, tensor in enumerate(self._parts()):
            gate_up = np.empty((2 * k, tensor.shape[3]), dtype=tensor.storage)
            down = np.empty((k, tensor.shape[3]), dtype=tensor.storage)

            def rows(first: int, last: int) -> list[memoryview]:
                return [memoryview(a[i]).cast("B") for j in range(first, last + 1) for a, i in ((gate_up, j), (gate_up, k + j), (down, j))]

            self._read_runs(tensor, layer, channels, rows, IOV_MAX // 3)
            pair = (0, 1) if slot == 0 else ((2, 4) if slot == 1 else (3, 5))
            fields[pair[0]], fields[pair[1]] = _as_mlx(gate_up, tensor.dtype), _as_mlx(down, tensor.dtype)
        return fields

    def _read_records(self, tensor: _Tensor, layer: int, channels: np.ndarray) -> np.ndarray:
        """Records ``[k, 3, X]`` of ascending ``channels``."""
        out = np.empty((len(channels), 3, tensor.shape[3]), dtype=tensor.storage)
        self._read_runs(tensor, layer, channels, lambda first, last: [memoryview(out[first : last + 1]).cast("B")], len(channels))
        return out

    def _read_runs(self, tensor: _Tensor, layer: int, channels: np.ndarray, buffers, per_read: int) -> None:
        """One positioned read per run of adjacent ``channels`` (at most ``per_read``
        channels each), into ``buffers(first, last)``: the destinations of those
        positions' records, in file order."""
        start, reads, total = time.perf_counter(), 0, 0
        with open(self.path, "rb", buffering=0) as f:
            for run_first, run_last in _runs(channels):
                for first in range(run_first, run_last + 1, per_read):
                    last = min(run_last, first + per_read - 1)
                    dest = buffers(first, last)
                    size = sum(len(d) for d in dest)
                    if os.preadv(f.fileno(), dest, tensor.channel_offset(layer, int(channels[first]))) != size:
                        raise IFPError(f"{self.path}: the FFN bank file is shorter than its header says")
                    reads, total = reads + 1, total + size
        self.stats.add(ReadStats(total, time.perf_counter() - start, reads))


def _runs(channels: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) positions of each run of consecutive channel numbers."""
    if len(channels) == 0:
        return []
    breaks = np.nonzero(np.diff(channels) != 1)[0]
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(channels) - 1]])
    return list(zip(starts.tolist(), ends.tolist()))


def _as_mlx(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    array = mx.array(a)
    return array.view(dtype) if dtype == mx.bfloat16 else array


def _read_header(path: Path, names: tuple[str, ...]) -> dict[str, _Tensor]:
    """The bank tensors' offsets and shapes, checked against each other and the file."""
    if not path.is_file():
        raise IFPError(f"{path}: the FFN bank file is missing")
    header, start = read_header(path)
    size = path.stat().st_size
    tensors = {}
    for name in names:
        entry = header.get(name)
        try:
            storage, dtype = DTYPES[entry["dtype"]]
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(v) for v in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise IFPError(f"{path}: no readable {name} in the FFN bank")
        tensor = _Tensor(start + begin, shape, storage, dtype)
        if len(shape) != 4 or shape[2] != 3 or end - begin != tensor.record_bytes * shape[0] * shape[1] or start + end > size:
            raise IFPError(f"{path}: {name} has a bad shape or size in the FFN bank header")
        tensors[name] = tensor
    return tensors
