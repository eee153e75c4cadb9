"""Bounded fuzzing of the safetensors reader (see tests/fuzzing.py), and what it found."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fuzzing import Case, Seed, _read_all, _refused, mutate, run_and_report
from ifp_mlx.convert.safetensors_io import read_safetensors

def _check_safetensors(path: Path, out: Path) -> None:
    _read_all(read_safetensors(path))


def _safetensors_seed(tmp: Path) -> bytes:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {
        "model.a": rng.standard_normal((4, 8)).astype(np.float32),
        "model.b": np.arange(8, dtype=np.float16),
        "model.c": np.arange(6, dtype=np.int64).reshape(2, 3),
        "model.empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.0, np.float64),
    }
    save_file(tensors, str(tmp / "seed.safetensors"), metadata={"format": "pt"})
    return (tmp / "seed.safetensors").read_bytes()


JSON_JUNK = [-1, 2**64, 2**63 - 1, 1 << 40, 1.5, "7", None, [], {}, [1, 2, 3], True]


def _header_variant(rng: random.Random, header: dict) -> dict:
    """Break one field of one entry the way a hand-edited or hostile header might."""
    name = rng.choice(sorted(header))
    entry = header[name]
    if name == "__metadata__" or not isinstance(entry, dict):
        header[name] = rng.choice(JSON_JUNK + [{"k": 1}])
        return header
    field = rng.choice(["dtype", "shape", "data_offsets", "extra", "whole"])
    if field == "dtype":
        entry["dtype"] = rng.choice(["F32", "BF16", "F8_E4M3", "C64", "", 5, None])
    elif field == "shape":
        entry["shape"] = rng.choice([[-1, 8], [2**62, 2**62], [1.5], ["4"], 4, [], [0], [1] * 64, [4, 8, 2]])
    elif field == "data_offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[end, begin], [begin], [begin, end, 0], [-8, end], [begin, 2**64], [0, 0], "0,8", [begin + 1, end + 1]]
        )
    elif field == "extra":
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    else:
        header[name] = rng.choice(JSON_JUNK)
    return header


def _safetensors_structural(seed: bytes) -> Callable[[random.Random], Case]:
    """A re-serialised header with one entry broken: the JSON parses, the layout lies."""
    (n,) = struct.unpack("<Q", seed[:8])

    def make(rng: random.Random) -> Case:
        header = json.loads(seed[8 : 8 + n])
        if rng.random() < 0.1:
            header = rng.choice([[], "x", 3, [header]])
        else:
            header = _header_variant(rng, header)
        blob = json.dumps(header).encode()
        data = struct.pack("<Q", len(blob)) + blob + seed[8 + n :]
        if rng.random() < 0.5:
            return data, [f"header {blob[:160]!r}"]
        data, steps = mutate(rng, data, [(0, 8)])
        return data, [f"header {blob[:160]!r}", *steps]

    return make


def test_fuzz_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    base = _safetensors_seed(tmp_path)
    seeds = [
        Seed("safetensors", base, [(0, 8)]),
        Seed("safetensors-header", base, [], _safetensors_structural(base)),
    ]
    run_and_report(seeds, ".safetensors", _check_safetensors, tmp_path / "work", "safetensors")


# ---------------------------------------------------------------------------
# What the fuzzer found, pinned as plain tests
# ---------------------------------------------------------------------------



def _safetensors_with_header(path: Path, header) -> Path:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(64))
    return path


@pytest.mark.parametrize(
    "header,fragment",
    [
        ([1, 2], "not a JSON object"),
        ({"w": 3}, "malformed header entry"),
        ({"w": {"dtype": "F32", "shape": [2]}}, "malformed data_offsets"),
        ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, "malformed shape"),
        ({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}, "malformed shape"),
        ({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, "its shape needs"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 0]}}, "its shape needs"),
        ({"w": {"dtype": None, "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype"),
        (b'{"w": ' + b"1" * 5000 + b"}", "unreadable header"),  # past int()'s digit limit
        (b"[" * 100_000 + b"]" * 100_000, "unreadable header"),  # past the recursion limit
    ],
)
def test_safetensors_header_entries_are_checked(tmp_path, header, fragment):
    _refused(read_safetensors, _safetensors_with_header(tmp_path / "m.safetensors", header), fragment)
