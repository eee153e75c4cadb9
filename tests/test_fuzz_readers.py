"""Bounded fuzzing of the checkpoint readers: a mutated file is read or refused, nothing else.

Checkpoints come from the internet, so every reader must treat its input as
hostile. Each case here mutates a small valid file written by the real writer
(``safetensors.numpy.save_file``, ``torch.save`` in both formats,
``gguf.GGUFWriter``), opens it and reads every tensor (and, for GGUF, the
config and the tokenizer). The property: that either succeeds or raises
``ConversionError`` with a one-line message naming the file; nothing else
escapes, no case runs over a second, and nothing is left on disk.

Mutations are byte-level (bit flips, overwrites, truncation, inserted,
duplicated and deleted chunks) plus huge values written into the format's own
length/count/offset fields, whose offsets are found from the seed file itself
so they hit the header rather than tensor bytes. GGUF and safetensors also
get structural variants (metadata values of the wrong type, broken JSON
entries) that byte flips rarely produce.

Regression tests for what the fuzzer found are at the end.

IFP_FUZZ_CASES sets the number of cases per reader (default 3000, about 20 s
for the whole file on two cores); IFP_FUZZ_SEED picks another random stream.
A failure names its case and mutations; the same seed reproduces it. See
docs/SECURITY.md for what each reader refuses.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import random
import resource
import signal
import struct
import sys
import time
import traceback
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from ifp_mlx.convert.errors import ConversionError
from ifp_mlx.convert.gguf_reader import read_gguf
from ifp_mlx.convert.safetensors_io import read_safetensors
from ifp_mlx.convert.torch_reader import read_torch

CASES = int(os.environ.get("IFP_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("IFP_FUZZ_SEED", "1234"))
CASE_LIMIT_S = 1.0  # the property, in CPU seconds: other processes on a busy runner don't count
HANG_S = 10.0  # a case still running after this is stopped and reported as a hang

Hot = list[tuple[int, int]]  # (offset, width) of the format's integer fields


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so a reader's `except Exception` can't eat it."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Stop a hung case (SIGALRM: macOS and Linux, where MLX runs)."""

    def alarm(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------


def _huge_values(width: int, old: int) -> list[int]:
    top = (1 << (8 * width)) - 1
    values = [top, top >> 1, (top >> 1) + 1, 0, 1, (old + 1) & top, (old - 1) & top]
    if width == 8:
        values += [1 << 60, 1 << 40, 1 << 32]
    if width >= 4:
        values += [1 << 31, (1 << 32) - 1]
    return values


def huge_int(rng: random.Random, data: bytearray, hot: Hot) -> str:
    if not hot:
        return flip(rng, data, hot)
    off, width = rng.choice(hot)
    if off + width > len(data):
        return "huge_int skipped"
    old = int.from_bytes(data[off : off + width], "little")
    value = rng.choice(_huge_values(width, old))
    data[off : off + width] = value.to_bytes(width, "little")
    return f"huge_int@{off}/{width}={value}"


def flip(rng: random.Random, data: bytearray, hot: Hot) -> str:
    # Mostly near the header: that is where the parsing is.
    span = len(data) if rng.random() < 0.3 else min(len(data), 512)
    spots = [rng.randrange(span) for _ in range(rng.randint(1, 8))]
    for pos in spots:
        data[pos] ^= 1 << rng.randrange(8)
    return f"flip@{spots}"


def overwrite(rng: random.Random, data: bytearray, hot: Hot) -> str:
    pos = rng.randrange(min(len(data), 512))
    chunk = bytes(rng.choice([0x00, 0xFF, rng.randrange(256)]) for _ in range(rng.randint(1, 8)))
    data[pos : pos + len(chunk)] = chunk
    return f"overwrite@{pos}={chunk.hex()}"


def truncate(rng: random.Random, data: bytearray, hot: Hot) -> str:
    n = rng.randrange(len(data))
    del data[n:]
    return f"truncate@{n}"


def insert(rng: random.Random, data: bytearray, hot: Hot) -> str:
    pos = rng.randrange(len(data) + 1)
    chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    data[pos:pos] = chunk
    return f"insert@{pos}+{len(chunk)}"


def duplicate(rng: random.Random, data: bytearray, hot: Hot) -> str:
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 256))
    pos = rng.randrange(len(data) + 1)
    data[pos:pos] = data[a:b]
    return f"duplicate[{a}:{b}]@{pos}"


def delete(rng: random.Random, data: bytearray, hot: Hot) -> str:
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 64))
    del data[a:b]
    return f"delete[{a}:{b}]"


MUTATORS = [huge_int] * 4 + [flip] * 3 + [overwrite, truncate, insert, duplicate, delete]


def mutate(rng: random.Random, seed: bytes, hot: Hot) -> tuple[bytes, list[str]]:
    data = bytearray(seed)
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not data:
            break
        steps.append(rng.choice(MUTATORS)(rng, data, hot))
    return bytes(data), steps


# ---------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------

Case = tuple[bytes, list[str]]  # the file's bytes and how they were made


@dataclass
class Seed:
    """A valid file and where its integer fields are; ``make`` overrides plain mutation."""

    name: str
    data: bytes
    hot: Hot
    make: Callable[[random.Random], Case] | None = None

    def case(self, rng: random.Random) -> Case:
        if self.make is not None:
            return self.make(rng)
        return mutate(rng, self.data, self.hot)


@dataclass
class Outcome:
    read: int = 0
    refused: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (kind of bug, the case)
    slowest: float = 0.0


def _run_case(path: Path, work: Path, check: Callable[[Path, Path], None]) -> tuple[str, str]:
    """("read" | "refused", "") or (kind of bug, detail)."""
    try:
        with _deadline(HANG_S):
            check(path, work / "out")
    except ConversionError as e:
        message = str(e)
        if "\n" in message or str(path) not in message:
            return "badly formed ConversionError", repr(message[:300])
        return "refused", ""
    except _Hang:
        return "hang", f"still running after {HANG_S:.0f} s"
    except Exception as e:  # noqa: BLE001 - the property under test
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{type(e).__name__} at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"
        return where, " ".join(str(e).split())[:160]
    return "read", ""


def _left_behind(work: Path, path: Path, outcome: str) -> list[str]:
    """The input is the only file that may be there; a tokenizer folder only after success."""
    extra = sorted(p.name for p in work.iterdir() if p != path and p.name != "out")
    if (work / "out").exists() and outcome != "read":
        extra.append("out/ after a refusal")
    return extra


def _clear_out(out: Path) -> None:
    if out.exists():
        for p in out.iterdir():
            p.unlink()
        out.rmdir()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def fuzz(seeds: list[Seed], suffix: str, check, work: Path, cases: int) -> Outcome:
    result = Outcome()
    path = work / f"mutant{suffix}"
    for i in range(cases):
        seed = seeds[i % len(seeds)]
        rng = random.Random(f"{SEED}:{seed.name}:{i}")
        data, steps = seed.case(rng)
        path.write_bytes(data)
        start = time.process_time()
        outcome, detail = _run_case(path, work, check)
        elapsed = time.process_time() - start
        result.slowest = max(result.slowest, elapsed)
        label = f"case {i} {seed.name} {steps}"
        if outcome not in ("read", "refused"):
            result.failures.append((outcome, f"{label}: {outcome}: {detail}"))
        elif elapsed > CASE_LIMIT_S:
            result.failures.append(("slow", f"{label}: took {elapsed:.2f} s of CPU"))
        for name in _left_behind(work, path, outcome):
            result.failures.append(("left files", f"{label}: left {name} behind"))
        _clear_out(work / "out")
        result.read += outcome == "read"
        result.refused += outcome == "refused"
    return result


def run_and_report(seeds: list[Seed], suffix: str, check, work: Path, label: str) -> None:
    """Fuzz, then fail with one line per kind of bug (its first case and how often)."""
    work.mkdir()
    peak = _peak_rss_mb()
    result = fuzz(seeds, suffix, check, work, CASES)
    grown = _peak_rss_mb() - peak
    print(f"{label}: {result.read} read, {result.refused} refused, slowest {result.slowest:.3f} s of CPU")
    kinds: dict[str, list[str]] = {}
    for kind, line in result.failures:
        kinds.setdefault(kind, []).append(line)
    lines = [f"{len(cases)} x {cases[0]}" for cases in kinds.values()]
    assert not kinds, f"{len(result.failures)} failing cases:\n" + "\n".join(lines)
    assert grown < 1024, f"the process peak grew by {grown:.0f} MB while fuzzing"


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


def _read_all(tensors) -> None:
    for st in tensors.values():
        array = st.read()
        assert tuple(array.shape) == tuple(st.shape), f"{st.name}: read {array.shape}, declared {st.shape}"


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
# torch
# ---------------------------------------------------------------------------

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
# GGUF
# ---------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 2, 1, 16, 32
GPT2_VOCAB = ["<s>", "</s>", "h", "e", "l", "o", "w", "he", "ll", "hell", "hello", "Ġ", "Ġw"]
SPM_VOCAB = ["<unk>", "<s>", "</s>", "▁", "h", "e", "he", "▁he", "<0x41>", "<0xC3>"]


def _tokenizer_kv(kind: str) -> dict:
    from gguf import GGUFValueType as V

    tokens = GPT2_VOCAB if kind == "gpt2" else SPM_VOCAB
    types = [3, 3] + [1] * (len(tokens) - 2)
    if kind == "llama":
        types = [2, 3, 3] + [1] * (len(tokens) - 5) + [6, 6]
    kv = {
        "tokenizer.ggml.model": (kind, V.STRING),
        "tokenizer.ggml.pre": ("smollm" if kind == "gpt2" else "default", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY),
        "tokenizer.ggml.token_type": (types, V.ARRAY),
        "tokenizer.ggml.bos_token_id": (1 if kind == "llama" else 0, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2 if kind == "llama" else 1, V.UINT32),
        "tokenizer.ggml.padding_token_id": (1, V.UINT32),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),
        "tokenizer.chat_template": ("{{ messages[0]['content'] }}", V.STRING),
    }
    if kind == "gpt2":
        kv["tokenizer.ggml.merges"] = (["h e", "l l", "he ll", "hell o", "Ġ w"], V.ARRAY)
    else:
        kv["tokenizer.ggml.scores"] = ([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)], V.ARRAY)
        kv["tokenizer.ggml.unknown_token_id"] = (0, V.UINT32)
        kv["tokenizer.ggml.add_space_prefix"] = (True, V.BOOL)
    return kv


def _hparams_kv(arch: str) -> dict:
    from gguf import GGUFValueType as V

    kv = {
        f"{arch}.block_count": (1, V.UINT32),
        f"{arch}.context_length": (256, V.UINT32),
        f"{arch}.embedding_length": (HIDDEN, V.UINT32),
        f"{arch}.feed_forward_length": (FFN, V.UINT32),
        f"{arch}.attention.head_count": (HEADS, V.UINT32),
        f"{arch}.attention.head_count_kv": (KV_HEADS, V.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        f"{arch}.rope.freq_base": (10000.0, V.FLOAT32),
        f"{arch}.rope.dimension_count": (HEAD_DIM, V.UINT32),
    }
    if arch == "llama":
        kv[f"{arch}.rope.scaling.type"] = ("linear", V.STRING)
        kv[f"{arch}.rope.scaling.factor"] = (2.0, V.FLOAT32)
    else:
        kv[f"{arch}.attention.key_length"] = (HEAD_DIM, V.UINT32)
        kv[f"{arch}.attention.sliding_window_pattern"] = ([True, False], V.ARRAY)
    return kv


def _gguf_tensors(arch: str, vocab: int) -> list[tuple[str, np.ndarray, str]]:
    """(name, float32 data, storage type) for a one-layer model."""
    rng = np.random.default_rng(1)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    t = [
        ("token_embd.weight", w(vocab, HIDDEN), "Q8_0"),
        ("output_norm.weight", 1 + w(HIDDEN), "F32"),
        ("blk.0.attn_norm.weight", 1 + w(HIDDEN), "F32"),
        ("blk.0.ffn_norm.weight", 1 + w(HIDDEN), "F32"),
        ("blk.0.attn_q.weight", w(HEADS * HEAD_DIM, HIDDEN), "Q4_0"),
        ("blk.0.attn_k.weight", w(KV_HEADS * HEAD_DIM, HIDDEN), "Q8_0"),
        ("blk.0.attn_v.weight", w(KV_HEADS * HEAD_DIM, HIDDEN), "F16"),
        ("blk.0.attn_output.weight", w(HIDDEN, HEADS * HEAD_DIM), "Q4_1"),
        ("blk.0.ffn_gate.weight", w(FFN, HIDDEN), "F32"),
        ("blk.0.ffn_up.weight", w(FFN, HIDDEN), "BF16"),
        ("blk.0.ffn_down.weight", w(HIDDEN, FFN), "Q4_0"),
    ]
    if arch == "gemma3":
        t += [("blk.0.post_attention_norm.weight", w(HIDDEN), "F32"), ("blk.0.post_ffw_norm.weight", w(HIDDEN), "F32")]
        t += [("blk.0.attn_q_norm.weight", w(HEAD_DIM), "F32"), ("blk.0.attn_k_norm.weight", w(HEAD_DIM), "F32")]
    else:
        t.append(("output.weight", w(vocab, HIDDEN), "Q8_0"))
    if arch == "llama":
        t.append(("rope_freqs.weight", _llama3_rope_factors(10000.0, 8.0), "F32"))
    return t


def _llama3_rope_factors(theta: float, factor: float) -> np.ndarray:
    """The per-frequency factors llama.cpp stores for Llama 3 RoPE scaling."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    smooth = (8192 / wavelen - 1) / 3
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, factor, ramp)).astype(np.float32)


def _write_gguf(path: Path, arch: str, tok: str, kv: dict) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype) in kv.items():
        writer.add_key_value(key, value, vtype)
    vocab = len(GPT2_VOCAB if tok == "gpt2" else SPM_VOCAB)
    for name, x, kind in _gguf_tensors(arch, vocab):
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, x)
        elif kind == "F16":
            writer.add_tensor(name, x.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _gguf_hot(path: Path) -> Hot:
    """Every integer field of the header, located through gguf's own reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    return [
        (part.ctypes.data - base, part.dtype.itemsize)
        for f in fields
        for part in f.parts
        if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8) and part.size == 1
    ]


def _random_value(rng: random.Random):
    from gguf import GGUFValueType as V

    return rng.choice(
        [
            (rng.choice([0, 1, 3, 2**31, 2**32 - 1]), V.UINT32),
            (rng.choice([-1, -(2**63), 2**62]), V.INT64),
            (rng.choice([2**64 - 1, 2**60]), V.UINT64),
            (rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30]), V.FLOAT32),
            (rng.choice(["", "x", "gpt2", "llama", "bert", "yarn", "linear", "qwen2", "a b c"]), V.STRING),
            (rng.choice([True, False]), V.BOOL),
            (rng.choice([["a", "b"], ["h e", "x"], ["only"]]), V.ARRAY),
            (rng.choice([[1, 2, 3], [-5], [0] * 20, [2**31 - 1]]), V.ARRAY),
            (rng.choice([[1.5, float("nan")], [0.0]]), V.ARRAY),
            (rng.choice([[True, False], [False]]), V.ARRAY),
            ([[1, 2], [3, 4]], V.ARRAY),
        ]
    )


GGUF_KINDS = [("llama", "gpt2"), ("gemma3", "llama"), ("qwen2", "gpt2")]


def _metadata_variant(tmp: Path, arch: str, tok: str) -> Callable[[random.Random], Case]:
    """The seed rewritten with one metadata key dropped or given an odd value and type."""

    def make(rng: random.Random) -> Case:
        kv = {**_hparams_kv(arch), **_tokenizer_kv(tok)}
        key = rng.choice(sorted(kv))
        if rng.random() < 0.15:
            del kv[key]
            steps = [f"without {key}"]
        else:
            kv[key] = _random_value(rng)
            steps = [f"{key}={kv[key][0]!r} as {kv[key][1].name}"]
        data = _write_gguf(tmp / "variant.gguf", arch, tok, kv)
        if rng.random() < 0.6:
            return data, steps
        data, more = mutate(rng, data, [])
        return data, steps + more

    return make


def _gguf_seeds(tmp: Path) -> list[Seed]:
    seeds = []
    for arch, tok in GGUF_KINDS:
        path = tmp / f"{arch}.gguf"
        data = _write_gguf(path, arch, tok, {**_hparams_kv(arch), **_tokenizer_kv(tok)})
        seeds.append(Seed(f"gguf-{arch}", data, _gguf_hot(path)))
        seeds.append(Seed(f"gguf-{arch}-metadata", data, [], _metadata_variant(tmp, arch, tok)))
    return seeds


def _check_gguf(path: Path, out: Path) -> None:
    ck = read_gguf(path)
    json.dumps(ck.config)
    _read_all(ck.tensors)
    ck.write_tokenizer(out)


def test_fuzz_gguf(tmp_path):
    pytest.importorskip("gguf")
    seeds = _gguf_seeds(tmp_path)
    for seed in seeds[::2]:  # the unmutated seeds read cleanly
        (tmp_path / "check.gguf").write_bytes(seed.data)
        _check_gguf(tmp_path / "check.gguf", tmp_path / "check_out")
    run_and_report(seeds, ".gguf", _check_gguf, tmp_path / "work", "gguf")


# ---------------------------------------------------------------------------
# What the fuzzer found, pinned as plain tests
# ---------------------------------------------------------------------------


def _refused(read: Callable[[Path], object], path: Path, *fragments: str) -> None:
    start = time.process_time()
    with pytest.raises(ConversionError) as err:
        read(path)
    assert time.process_time() - start < CASE_LIMIT_S
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


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
