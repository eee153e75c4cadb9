"""Bounded fuzzing of the torch reader, zip and legacy formats (see tests/fuzzing.py), and what it found."""

from __future__ import annotations

import io
import pickletools
import random
import struct
import zipfile
from pathlib import Path
from typing import Callable

import pytest
from fuzzing import Case, Hot, Seed, _peak_rss_mb, _read_all, _refused, mutate, run_and_report
from ifp_mlx.convert.torch_reader import read_torch


# Widths of the pickle opcode arguments worth blowing up: ints, lengths, memo slots.
_PICKLE_ARG_WIDTHS = {
    "BININT": 4, "BININT1": 1, "BININT2": 2, "LONG1": 1, "LONG4": 4,
    "BINUNICODE": 4, "SHORT_BINUNICODE": 1, "BINUNICODE8": 8, "BINBYTES": 4,
    "SHORT_BINBYTES": 1, "BINBYTES8": 8, "BINPUT": 1, "LONG_BINPUT": 4,
    "BINGET": 1, "LONG_BINGET": 4, "FRAME": 8, "PROTO": 1,
}  # fmt: skip


def _pickle_hot(data: bytes, start: int) -> tuple[Hot, int]:
    """Integer fields of the pickle at ``start`` and the offset just past it."""
    hot, end = [], start
    for op, _, pos in pickletools.genops(data[start:]):
        if op.name in _PICKLE_ARG_WIDTHS:
            hot.append((start + pos + 1, _PICKLE_ARG_WIDTHS[op.name]))
        end = start + pos + 1
    return hot, end


def _zip_hot(data: bytes, path: Path) -> Hot:
    """Sizes, offsets and lengths in the zip headers, plus the ints of data.pkl."""
    hot: Hot = []
    for sig, fields in (
        (b"PK\x03\x04", [(14, 4), (18, 4), (22, 4), (26, 2), (28, 2)]),
        (b"PK\x01\x02", [(20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)]),
        (b"PK\x05\x06", [(8, 2), (10, 2), (12, 4), (16, 4)]),
        (b"PK\x06\x06", [(24, 8), (32, 8), (40, 8), (48, 8)]),
        (b"PK\x06\x07", [(8, 8)]),
    ):
        at = data.find(sig)
        while at >= 0:
            hot += [(at + off, width) for off, width in fields]
            at = data.find(sig, at + 1)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        hot += _pickle_hot(data, info.header_offset + 30 + name_len + extra_len)[0]
    return hot


def _legacy_hot(data: bytes) -> Hot:
    """The five pickles' ints, then each storage record's element count (float32 only)."""
    hot: Hot = []
    pos = 0
    for _ in range(5):
        more, pos = _pickle_hot(data, pos)
        hot += more
    while pos + 8 <= len(data):
        hot.append((pos, 8))
        pos += 8 + 4 * int.from_bytes(data[pos : pos + 8], "little")
    return hot


def _torch_state():
    import torch

    torch.manual_seed(0)
    w = torch.randn(4, 8)
    return {
        "model": {
            "w": w,
            "row": w[1],  # a view sharing w's storage
            "t": torch.randn(3, 4).t(),  # non-contiguous
            "h": torch.randn(5).half(),
            "bf": torch.randn(2, 2).bfloat16(),
            "i": torch.arange(6).reshape(2, 3),
            "p": torch.nn.Parameter(torch.ones(2)),
        },
        "step": 3,
        "name": "tiny",
    }


def _crafted_zip(tmp: Path, name: str, pickle_bytes: bytes) -> bytes:
    """A torch-shaped zip around a hand-written pickle (deep or cyclic structures)."""
    path = tmp / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
    return path.read_bytes()


def _torch_seeds(tmp: Path) -> list[Seed]:
    import pickle

    import torch

    state = _torch_state()
    torch.save(state, tmp / "zip.pt")
    legacy_state = {"w": torch.randn(4, 8), "b": torch.randn(8), "v": torch.randn(6)[2:]}
    torch.save(legacy_state, tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    cyclic: dict = {"x": 1}
    cyclic["self"] = cyclic
    shared: dict = {"x": 1}
    for _ in range(40):  # 2**40 paths through 81 dicts
        shared = {"a": shared, "b": shared}
    deep = b"\x80\x02" + b"}K\x00" * 10_000 + b"N" + b"s" * 10_000 + b"."  # past any recursion limit
    wide = pickle.dumps({str(i): {"a": i} for i in range(2000)}, protocol=2)
    zip_data = (tmp / "zip.pt").read_bytes()
    legacy_data = (tmp / "legacy.pt").read_bytes()
    seeds = [
        Seed("torch-zip", zip_data, _zip_hot(zip_data, tmp / "zip.pt")),
        Seed("torch-legacy", legacy_data, _legacy_hot(legacy_data)),
    ]
    crafted = {"cyclic": pickle.dumps(cyclic, protocol=2), "shared": pickle.dumps(shared, protocol=2)}
    for name, blob in {**crafted, "deep": deep, "wide": wide}.items():
        data = _crafted_zip(tmp, f"{name}.pt", blob)
        seeds.append(Seed(f"torch-{name}", data, _zip_hot(data, tmp / f"{name}.pt")))
    return seeds


def _rezipped(seed: bytes, mutated_pickle: Callable[[bytes], bytes]) -> bytes:
    """The same torch zip with data.pkl replaced: CRCs stay valid, so the pickle is parsed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seed)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = mutated_pickle(data)
            dst.writestr(info.filename, data)
    return out.getvalue()


def _pickle_variant(seed: Seed) -> Seed:
    """Mutated pickles inside an intact zip (byte flips in the zip itself fail its CRC)."""
    with zipfile.ZipFile(io.BytesIO(seed.data)) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        hot = _pickle_hot(zf.read(name), 0)[0]

    def make(rng: random.Random) -> Case:
        steps: list[str] = []

        def mutate_pickle(data: bytes) -> bytes:
            data, more = mutate(rng, data, hot)
            steps.extend(more)
            return data

        return _rezipped(seed.data, mutate_pickle), ["in data.pkl", *steps]

    return Seed(f"{seed.name}-pickle", seed.data, [], make)


def _check_torch(path: Path, out: Path) -> None:
    _read_all(read_torch(path))


def test_fuzz_torch(tmp_path):
    pytest.importorskip("torch")
    seeds = _torch_seeds(tmp_path)
    for seed in seeds[:2]:  # the real files are valid to start with
        (tmp_path / "check.pt").write_bytes(seed.data)
        _read_all(read_torch(tmp_path / "check.pt"))
    # Mostly the real files; the crafted (cyclic, shared, deep, wide) ones need fewer cases.
    zipped, legacy, crafted = seeds[0], seeds[1], seeds[2:]
    pickled = [_pickle_variant(s) for s in (zipped, *crafted)]
    seeds = [zipped, legacy, pickled[0]] * 3 + crafted + pickled[1:]
    run_and_report(seeds, ".pt", _check_torch, tmp_path / "work", "torch")


# ---------------------------------------------------------------------------
# What the fuzzer found, pinned as plain tests
# ---------------------------------------------------------------------------



def _torch_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def test_torch_cycles_and_shared_dicts_are_bounded(tmp_path):
    import pickle

    cyclic: dict = {}
    cyclic["self"] = cyclic
    _refused(read_torch, _torch_zip(tmp_path / "c.pt", pickle.dumps(cyclic)), "more than 64 deep")
    shared: dict = {}
    for _ in range(60):
        shared = {"a": shared, "b": shared}
    _refused(read_torch, _torch_zip(tmp_path / "s.pt", pickle.dumps(shared)), "more than 262144 entries")


def test_torch_memo_index_costs_no_memory(tmp_path):
    """LONG_BINPUT 2**32-1: the C unpickler would grow its memo array to 32 GB."""
    peak = _peak_rss_mb()
    blob = b"\x80\x02}r\xff\xff\xff\xff."  # EMPTY_DICT, LONG_BINPUT, STOP
    _refused(read_torch, _torch_zip(tmp_path / "m.pt", blob), "holds no tensors")
    assert _peak_rss_mb() - peak < 256


def test_torch_build_cannot_rewrite_a_checked_tensor(tmp_path):
    """BUILD on a rebuilt tensor would replace its checked layout (here with a non-int stride)."""
    import pickle
    from collections import OrderedDict

    torch = pytest.importorskip("torch")
    storage = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is storage else None

    class Tensor:
        def __reduce__(self):
            args = (storage, 0, (4,), (1,), False, OrderedDict())
            return torch._utils._rebuild_tensor_v2, args, {"stride": ("x",)}

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
    path = _torch_zip(tmp_path / "b.pt", buf.getvalue(), {"0": bytes(16)})
    _refused(read_torch, path, "sets attributes")


def test_torch_zip_oddities(tmp_path):
    """An unknown compression method, and a storage whose declared size outruns the file."""
    import pickle

    path = _torch_zip(tmp_path / "z.pt", pickle.dumps({"x": 1}))
    data = bytearray(path.read_bytes())
    for sig, field_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.find(sig)
        data[at + field_at : at + field_at + 2] = (99).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    _refused(read_torch, path, "corrupt zip member", "NotImplementedError")

    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(4)}, tmp_path / "t.pt")
    data = bytearray((tmp_path / "t.pt").read_bytes())
    at = data.find(b"PK\x01\x02", data.find(b"/data/0") - 80)  # the central entry of data/0
    data[at + 20 : at + 28] = (1 << 31).to_bytes(4, "little") * 2  # compressed and plain sizes
    (tmp_path / "t.pt").write_bytes(bytes(data))
    _refused(read_torch, tmp_path / "t.pt")
