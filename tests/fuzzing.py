"""Shared machinery of the bounded reader fuzzing (tests/test_fuzz_*.py).

Checkpoints come from the internet, so every reader must treat its input as
hostile. Each case mutates a small valid file written by the real writer
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

Regression tests for what the fuzzer found are at the end of each test file.

IFP_FUZZ_CASES sets the number of cases per reader (default 3000, about 20 s
for all three readers on two cores); IFP_FUZZ_SEED picks another random stream.
A failure names its case and mutations; the same seed reproduces it. See
docs/SECURITY.md for what each reader refuses.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
from ifp_mlx.convert.errors import ConversionError

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



def _read_all(tensors) -> None:
    for st in tensors.values():
        array = st.read()
        assert tuple(array.shape) == tuple(st.shape), f"{st.name}: read {array.shape}, declared {st.shape}"


def _refused(read: Callable[[Path], object], path: Path, *fragments: str) -> None:
    start = time.process_time()
    with pytest.raises(ConversionError) as err:
        read(path)
    assert time.process_time() - start < CASE_LIMIT_S
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
