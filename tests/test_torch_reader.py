"""read_torch against files written by real torch.save, in both formats."""

import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from ifp_mlx.convert.errors import ConversionError
from ifp_mlx.convert.torch_reader import read_torch

torch = pytest.importorskip("torch")

FORMATS = pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])


def _save(obj, path, legacy: bool):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _expected(t) -> np.ndarray:
    """What read() must return: bfloat16 widens to float32, all else is as stored."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()


def _assert_same(source, original):
    got, want = source.read(), _expected(original)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.flags.c_contiguous
    assert got.tobytes() == want.tobytes()  # bit exact, NaN payloads included


def _assert_refused(path, *fragments):
    with pytest.raises(ConversionError) as info:
        read_torch(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


@FORMATS
def test_dtypes_bit_exact(tmp_path, legacy):
    floats = torch.tensor([1.5, -0.0, float("inf"), float("nan"), 3e-8, -65504.0])
    tensors = {
        "f32": torch.randn(3, 5),
        "f32_special": floats,
        "f16": floats.half(),
        "bf16": torch.randn(4, 3).bfloat16(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.tensor([-(2**62), -1, 0, 2**62]),
        "i32": torch.tensor([-(2**31), 7], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.25),
        "empty": torch.zeros(0, 3),
    }
    found = read_torch(_save(tensors, tmp_path / "m.pt", legacy))
    assert list(found) == list(tensors)
    for name, t in tensors.items():
        assert found[name].shape == tuple(t.shape)
        assert found[name].dtype == str(t.dtype).removeprefix("torch.")
        assert found[name].nbytes == t.numel() * t.element_size()
        _assert_same(found[name], t)


@FORMATS
def test_views_tied_weights_and_parameters(tmp_path, legacy):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(3, 2)
    tensors = {
        "base": base,
        "slice": base[1:3, 2:5],  # offset into a shared storage, row stride 6
        "transposed": base.t(),
        "column": base[:, 3],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0
        "tied_a": tied,
        "tied_b": tied,
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "bf16_view": torch.randn(4, 4).bfloat16()[::2, 1:],
    }
    found = read_torch(_save(tensors, tmp_path / "m.pt", legacy))
    for name, t in tensors.items():
        _assert_same(found[name], t)


@FORMATS
def test_module_state_dict_and_nested_checkpoint(tmp_path, legacy):
    nn = torch.nn
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    state = model.state_dict()
    assert isinstance(state, OrderedDict)

    found = read_torch(_save(state, tmp_path / "sd.pt", legacy))
    assert list(found) == list(state)
    for name, t in state.items():
        _assert_same(found[name], t)

    checkpoint = {"model": state, "epoch": 3, "note": "x", "steps": [1, 2]}
    found = read_torch(_save(checkpoint, tmp_path / "ckpt.pt", legacy))
    assert list(found) == [f"model.{name}" for name in state]
    _assert_same(found["model.1.weight"], state["1.weight"])


def test_read_is_lazy_and_independent(tmp_path):
    a, b = torch.full((4,), 1.5), torch.full((4,), 2.5)
    path = _save({"a": a, "b": b}, tmp_path / "m.pt", legacy=False)
    found = read_torch(path)
    # Change a's bytes after indexing: read() must go to the file for its own
    # bytes only, so a sees the change and b does not.
    data = path.read_bytes()
    old = a.numpy().tobytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, np.full(4, 7.0, np.float32).tobytes()))
    assert found["b"].read().tolist() == [2.5] * 4
    assert found["a"].read().tolist() == [7.0] * 4


def test_uint16_written_with_rebuild_v3(tmp_path):
    t = torch.tensor([0, 1, 65535], dtype=torch.uint16)
    found = read_torch(_save({"u16": t}, tmp_path / "m.pt", legacy=False))
    assert found["u16"].read().tolist() == [0, 1, 65535]


@pytest.mark.parametrize("dtype", ["complex64", "float8_e4m3fn"])
def test_unsupported_dtype(tmp_path, dtype):
    tensor = torch.zeros(2, dtype=getattr(torch, dtype))
    path = _save({"x": tensor}, tmp_path / "m.pt", legacy=False)
    _assert_refused(path, "unsupported dtype")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["pickle", "pickle4", "zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "MARKER"
    payload = {"weight": torch.ones(2), "evil": _Evil(marker)}
    path = tmp_path / "evil.pt"
    if kind.startswith("pickle"):
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=4 if kind == "pickle4" else 2))
    else:
        _save(payload, path, legacy=kind == "legacy")
    message = _assert_refused(path, "refusing to load")
    assert f"{os.system.__module__}.system" in message  # posix.system
    assert not marker.exists()


def test_truncated_files(tmp_path):
    for legacy in (False, True):
        path = _save({"w": torch.randn(64, 64)}, tmp_path / f"m{legacy}.pt", legacy)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        _assert_refused(path)


def test_missing_storage_record(tmp_path):
    path = _save({"w": torch.randn(3)}, tmp_path / "m.pt", legacy=False)
    stripped = tmp_path / "stripped.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
    _assert_refused(stripped, "missing storage record")


@pytest.mark.parametrize("head", [b"", b"\x80\x02", b"PK\x03\x04"])
def test_not_a_torch_file(tmp_path, head):
    path = tmp_path / "junk.bin"
    path.write_bytes(head + np.random.default_rng(0).bytes(4096))
    _assert_refused(path)


def test_plain_pickle_without_tensors(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    _assert_refused(path, "not a torch file")
