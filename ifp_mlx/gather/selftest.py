"""``ifp selftest``: every gather path against its reference, on awkward shapes.

The Metal kernels can only run on an Apple GPU, and the machines that run the
test suite have none, so a Mac checks itself: each kernel against the portable
gather (``mx.take``), bit for bit, on the shapes most likely to break an index
formula (k not a multiple of 8, inputs under 8 elements, which MLX passes in
``constant`` memory, odd row widths, one layer), for every float dtype and every
affine bit width and group size, with scales and biases of different dtypes.
Everywhere, the portable gather is checked against a plain numpy reference on
the same cases. The bandwidth of each path is measured on a bank the size of a
1B-parameter model's.

The cases and the reference live here, not in the tests, so the test suite's
C++ build of the kernel bodies runs on the very cases a Mac checks.
"""

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..errors import IFPError
from ..model.bank import Bank, CompactFFN, gather_rows, quantize_records
from .backend import KERNEL_ERRORS, one_line
from .metal import KERNELS, gather_metal

FLOATS = (mx.float32, mx.float16, mx.bfloat16)
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)

# Every CompactFFN field a gather can write (the quantized kernel writes them all).
FIELDS = KERNELS["gather_quantized_records"].outputs


class Case(NamedTuple):
    """One gather to check: a random bank of this shape and ``k`` random channels a layer."""

    layers: int
    d_ff: int
    d: int
    k: int
    dtype: mx.Dtype  # float bank's dtype, or the scales' dtype of a quantized one
    bits: int | None = None
    group_size: int | None = None
    bias_dtype: mx.Dtype | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def describe(case: Case) -> str:
    """The case in one short line: format first, then the shape."""
    shape = f"L={case.layers} d_ff={case.d_ff} d={case.d} k={case.k}"
    if not case.quantized:
        return f"{dtype_name(case.dtype)} {shape}"
    fmt = f"{case.bits}-bit g{case.group_size} scales {dtype_name(case.dtype)}"
    return f"{fmt} biases {dtype_name(case.bias_dtype)} {shape}"


# (layers, d_ff, d, k): each under every float dtype.
FLOAT_SHAPES = [
    (1, 1, 2, 1),  # every input under 8 elements: all in constant memory
    (1, 50, 40, 3),  # small indices, large bank: constant beside device
    (1, 50, 40, 13),
    (3, 37, 96, 5),
    (2, 64, 200, 21),
    (4, 24, 40, 24),  # k == d_ff
    (2, 20, 7, 3),  # 7-element rows: 14 or 28 bytes, no uint64 words
    (2, 20, 3, 9),  # 3-element rows: 6 or 12 bytes
]
# (layers, d_ff, groups a row, k): one per (bits, group size), in turn.
QUANT_SHAPES = [
    (1, 40, 3, 13),
    (3, 33, 1, 9),  # one group a row
    (2, 24, 3, 5),
    (2, 50, 2, 17),
    (1, 16, 1, 3),  # L=1, indices in constant memory
    (2, 30, 3, 11),
]
SAME_DTYPES = [(mx.float32, mx.float32), (mx.float16, mx.float16), (mx.bfloat16, mx.bfloat16)]
MIXED_DTYPES = [(mx.float16, mx.float32), (mx.bfloat16, mx.float32), (mx.float32, mx.float16)]
# Quantized banks with every input under 8 elements, or only the scales and biases.
TINY_QUANT = [
    Case(1, 1, 32, 1, mx.float16, 2, 32, mx.float32),  # 3 uint64 words, 3 scales
    Case(1, 1, 32, 1, mx.bfloat16, 8, 32, mx.bfloat16),  # 12 words, 3 scales
    Case(1, 2, 64, 1, mx.float32, 4, 64, mx.float16),  # 24 words, 6 scales
]


def float_cases() -> list[Case]:
    return [Case(*shape, dtype) for shape in FLOAT_SHAPES for dtype in FLOATS]


def quant_cases() -> list[Case]:
    """Every bit width with every group size, once with scales and biases of one
    dtype and once of two, cycling through the shapes and the dtype pairs."""
    cases = list(TINY_QUANT)
    for n, (bits, group_size) in enumerate((b, g) for b in BITS for g in GROUP_SIZES):
        layers, d_ff, groups, k = QUANT_SHAPES[n % len(QUANT_SHAPES)]
        j = (n + n // len(GROUP_SIZES)) % 3  # each bit width meets every dtype pair
        for scales, biases in (SAME_DTYPES[j], MIXED_DTYPES[j]):
            cases.append(Case(layers, d_ff, groups * group_size, k, scales, bits, group_size, biases))
    return cases


CASES = float_cases() + quant_cases()


def case_bank(case: Case, seed: int) -> Bank:
    """A random bank of the case's format (quantized from float records)."""
    rng = np.random.default_rng(seed)
    records = mx.array(rng.standard_normal((case.layers, case.d_ff, 3, case.d)).astype(np.float32))
    if not case.quantized:
        return Bank(records.astype(case.dtype))
    weight, scales, biases = quantize_records((records * 0.1).astype(case.dtype), case.bits, case.group_size)
    biases = biases.astype(case.bias_dtype)
    return Bank(weight, scales, biases, bits=case.bits, group_size=case.group_size)


def case_indices(case: Case, seed: int) -> mx.array:
    """Ascending distinct channels per layer, ``[L, k]`` uint32, as a selection is."""
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(case.d_ff, size=case.k, replace=False)) for _ in range(case.layers)]
    return mx.array(np.stack(rows).astype(np.uint32))


def case_inputs(i: int, case: Case) -> tuple[Bank, mx.array]:
    """The bank and indices of case number ``i`` (the same on every machine)."""
    return case_bank(case, seed=i), case_indices(case, seed=1000 + i)


# --- the reference and the comparison ------------------------------------------


def raw_bits(a: mx.array) -> np.ndarray:
    """The raw bits of ``a`` as unsigned words (numpy has no bfloat16; bits compare exactly)."""
    word = getattr(mx, f"uint{8 * a.dtype.size}")
    return np.ascontiguousarray(np.array(a if a.dtype == word else a.view(word)))


def _from_bits(bits: np.ndarray, dtype: mx.Dtype) -> mx.array:
    a = mx.array(bits)
    return a if a.dtype == dtype else a.view(dtype)


def reference_gather(bank: Bank, indices: mx.array) -> CompactFFN:
    """The gather spelled out in numpy, layer by layer, on raw bits: what every path must give."""
    idx = np.array(indices).astype(np.int64)
    fields = {}
    for suffix, a in {"": bank.weight, "_scales": bank.scales, "_biases": bank.biases}.items():
        if a is None:
            continue
        bits = raw_bits(a)
        records = np.stack([bits[l, idx[l]] for l in range(idx.shape[0])])  # [L, k, 3, X]
        gate_up = np.concatenate([records[:, :, 0], records[:, :, 1]], axis=1)
        fields["gate_up" + suffix] = _from_bits(gate_up, a.dtype)
        fields["down_t" + suffix] = _from_bits(np.ascontiguousarray(records[:, :, 2]), a.dtype)
    return CompactFFN(**fields, bits=bank.bits, group_size=bank.group_size)


def differing_fields(got: CompactFFN, want: CompactFFN) -> list[str]:
    """The fields where two gathers differ in presence, dtype, shape or any bit."""
    bad = [] if (got.bits, got.group_size) == (want.bits, want.group_size) else ["format"]
    for field in FIELDS:
        x, y = getattr(got, field), getattr(want, field)
        if (x is None) != (y is None):
            bad.append(field)
        elif x is not None:
            same = x.dtype == y.dtype and x.shape == y.shape
            if not (same and np.array_equal(raw_bits(x), raw_bits(y))):
                bad.append(field)
    return bad


def _evaluated(ffn: CompactFFN) -> CompactFFN:
    mx.eval(ffn.arrays())
    return ffn


def check_case(bank: Bank, indices: mx.array, metal: bool) -> list[str]:
    """What disagrees for one case: ``[]`` when portable equals numpy and, with
    ``metal``, the Metal kernel equals portable; else one note per failed check."""
    notes = []
    portable = _evaluated(gather_rows(bank, indices))
    if bad := differing_fields(portable, reference_gather(bank, indices)):
        notes.append(f"portable!=numpy ({', '.join(bad)})")
    if metal:
        try:
            if bad := differing_fields(_evaluated(gather_metal(bank, indices)), portable):
                notes.append(f"metal!=portable ({', '.join(bad)})")
        except KERNEL_ERRORS as e:
            notes.append(f"metal failed: {one_line(e)}")
    return notes


# --- bandwidth ---------------------------------------------------------------------


class BandwidthBank(NamedTuple):
    """The bank the bandwidth is measured on; the defaults are a 1B-class model's."""

    layers: int = 16
    d_ff: int = 8192
    d: int = 2048
    bits: int = 4  # 16: a float16 bank
    group_size: int = 64
    keep: float = 0.5

    def describe(self) -> str:
        fmt = "float16" if self.bits == 16 else f"{self.bits}-bit g{self.group_size}"
        return f"{fmt} L={self.layers} d_ff={self.d_ff} d={self.d} k={self.k}"

    @property
    def k(self) -> int:
        return max(1, round(self.keep * self.d_ff))


def check_spec(spec: BandwidthBank) -> None:
    """Refuse, in one line, a bandwidth bank MLX cannot build."""
    if spec.layers < 1 or spec.d_ff < 1 or spec.d < 1 or not 0 < spec.keep <= 1:
        given = f"--layers {spec.layers} --d-ff {spec.d_ff} --hidden {spec.d} --keep {spec.keep}"
        raise IFPError(f"the bandwidth bank needs positive sizes and 0 < --keep <= 1, got {given}")
    if spec.bits == 16:
        return
    if spec.bits not in BITS or spec.group_size not in GROUP_SIZES or spec.d % spec.group_size:
        raise IFPError(
            f"--bits must be one of {', '.join(map(str, BITS))} or 16, and --group-size one of "
            f"{', '.join(map(str, GROUP_SIZES))} dividing --hidden; got {spec.bits}, {spec.group_size}, {spec.d}"
        )


def bandwidth_inputs(spec: BandwidthBank) -> tuple[Bank, mx.array]:
    """A bank of random bits in the spec's format, and a random selection of ``k`` a layer.

    The contents do not matter to a copy, so the words are random integers, not
    a quantized model: building this is fast even on a CPU.
    """
    check_spec(spec)
    weight_key, scales_key, indices_key = mx.random.split(mx.random.key(0), 3)
    rows = (spec.layers, spec.d_ff, 3)
    if spec.bits == 16:
        bank = Bank(mx.random.normal((*rows, spec.d), key=weight_key).astype(mx.float16))
    else:
        shape = (*rows, spec.d * spec.bits // 32)
        words = mx.random.randint(0, 2**31 - 1, shape, mx.int32, key=weight_key).view(mx.uint32)
        scales = mx.random.uniform(shape=(*rows, spec.d // spec.group_size), key=scales_key)
        scales = scales.astype(mx.float16)
        bank = Bank(words, scales, -scales, bits=spec.bits, group_size=spec.group_size)
    order = mx.argsort(mx.random.uniform(shape=(spec.layers, spec.d_ff), key=indices_key), axis=1)
    indices = mx.sort(order[:, : spec.k], axis=1).astype(mx.uint32)
    mx.eval([a for a in (bank.weight, bank.scales, bank.biases, indices) if a is not None])
    return bank, indices


Gather = Callable[[Bank, mx.array], CompactFFN]


def gather_bandwidth(gather: Gather, bank: Bank, indices: mx.array, rounds: int) -> tuple[float, float]:
    """Median seconds of one evaluated gather and its GB/s, counting each gathered
    byte twice (read from the bank, written to the compact arrays)."""
    warm_up = _evaluated(gather(bank, indices))  # and, for Metal, the compile
    moved = 2 * sum(a.nbytes for a in warm_up.arrays())
    times = []
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        _evaluated(gather(bank, indices))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return seconds, moved / seconds / 1e9


# --- the command ---------------------------------------------------------------------


def platform_line(metal: bool) -> str:
    if metal:
        return "gather backend: metal (checking the Metal kernels against the portable gather)"
    return (
        "gather backend: portable (no Metal back-end on this platform: mx.metal.is_available() is False); "
        "the Metal kernels run only on an Apple GPU, so only the portable gather is checked here"
    )


def check_cases(out: Callable[[str], None], metal: bool) -> int:
    """Check every case, one line each; the number of cases that did not match."""
    checks = "portable=numpy" + (", metal=portable" if metal else "")
    mismatched = 0
    for i, case in enumerate(CASES):
        notes = check_case(*case_inputs(i, case), metal)
        mismatched += bool(notes)
        status = "MISMATCH" if notes else "match"
        out(f"{status:<9}{describe(case):<68}{'; '.join(notes) or checks}")
    return mismatched


def measure(out: Callable[[str], None], spec: BandwidthBank, rounds: int, metal: bool) -> int:
    """The bandwidth of each path, one line each; the number of paths that failed."""
    bank, indices = bandwidth_inputs(spec)
    paths = [("portable", gather_rows)] + ([("metal", gather_metal)] if metal else [])
    failed = 0
    for name, gather in paths:
        try:
            seconds, gbps = gather_bandwidth(gather, bank, indices, rounds)
        except KERNEL_ERRORS as e:
            failed += 1
            out(f"bandwidth {name:<9}failed: {one_line(e)}")
            continue
        speed = f"{gbps:.1f} GB/s read + write ({1000 * seconds:.1f} ms a gather)"
        out(f"bandwidth {name:<9}{spec.describe()}: {speed}")
    return failed


DEFAULT_BANK = BandwidthBank()


def run_selftest(out: Callable[[str], None] = print, spec: BandwidthBank = DEFAULT_BANK, rounds: int = 5) -> bool:
    """Check every case, then measure the bandwidth; ``True`` when all match and all ran."""
    check_spec(spec)
    metal = mx.metal.is_available()
    out(platform_line(metal))
    mismatched = check_cases(out, metal)
    failed = measure(out, spec, rounds, metal)
    summary = f"{len(CASES) - mismatched} of {len(CASES)} cases match"
    out(summary + (f", {failed} bandwidth run(s) failed" if failed else ""))
    return mismatched == 0 and failed == 0
