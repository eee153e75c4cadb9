"""The gather backends: Metal kernel bodies run as C++, the portable path, the math.

Metal cannot run on Linux, so the tests compile the *same* kernel bodies that
``gather_metal`` hands to ``mx.fast.metal_kernel`` as C++ (through
``tests/metal_shim.h``), run them on exactly the launch that ``gather_metal``
builds (inputs, template, grid, output shapes and dtypes) and compare the result
bit for bit with ``gather_portable``. A signature test checks that the C++
wrappers match the signature MLX generates for the kernels.
"""

import ctypes
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ifp_mlx.gather import metal as gather_mod
from ifp_mlx.gather.backend import gather
from ifp_mlx.gather.metal import (
    KERNELS,
    compact_from_outputs,
    gather_metal,
    kernel_launch,
    kernel_source,
)
from ifp_mlx.model.bank import Bank, CompactFFN, quantize_records
from ifp_mlx.model.bank import gather_rows as gather_portable
from ifp_mlx.select.base import round_k

TESTS = Path(__file__).parent

# The signatures MLX generates (inputs, each followed by the shape it uses,
# then outputs), with T and Q for the template types.
TEMPLATE_PARAMS = {"gather_records": ("T",), "gather_quantized_records": ("T", "Q")}
SIGNATURES = {
    "gather_records": [
        ("const device T*", "records"),
        ("const constant int*", "records_shape"),
        ("const device uint32_t*", "indices"),
        ("const constant int*", "indices_shape"),
        ("device T*", "gate_up"),
        ("device T*", "down_t"),
    ],
    "gather_quantized_records": [
        ("const device Q*", "weight"),
        ("const constant int*", "weight_shape"),
        ("const device T*", "scales"),
        ("const constant int*", "scales_shape"),
        ("const device T*", "biases"),
        ("const device uint32_t*", "indices"),
        ("const constant int*", "indices_shape"),
        ("device Q*", "gate_up"),
        ("device Q*", "down_t"),
        ("device T*", "gate_up_scales"),
        ("device T*", "gate_up_biases"),
        ("device T*", "down_t_scales"),
        ("device T*", "down_t_biases"),
    ],
}
# Template types each C++ build instantiates: (dtype name, C++ type, MLX's Metal name).
_FLOATS = [("float32", "float", "float"), ("float16", "half", "float16_t")]
_FLOATS += [("bfloat16", "bfloat16_t", "bfloat16_t")]
_UINTS = [(f"uint{b}", f"uint{b}_t", f"uint{b}_t") for b in (8, 16, 32, 64)]
TEMPLATE_TYPES = {
    "gather_records": {"T": _FLOATS + _UINTS},
    "gather_quantized_records": {"T": _FLOATS, "Q": _UINTS[2:]},
}
METAL_TYPE_NAMES = {name: metal for name, _, metal in _FLOATS + _UINTS}

_NP_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _bits(a: mx.array) -> np.ndarray:
    """The raw bits of ``a`` (numpy has no bfloat16; bits compare exactly)."""
    word = getattr(mx, f"uint{8 * a.dtype.size}")
    return np.ascontiguousarray(np.array(a if a.dtype == word else a.view(word)))


def _symbol(name: str, template: list) -> str:
    return name + "".join(f"__{_dtype_name(dtype)}" for _, dtype in template)


# --- the C++ build of the kernel bodies ----------------------------------------


def _cpp_kernel(name: str) -> str:
    """The body inside a function template carrying the kernel's parameter names,
    a runner looping over the grid, and C entry points per template type."""
    tparams = TEMPLATE_PARAMS[name]
    tdecl = "template <" + ", ".join(f"typename {t}" for t in tparams) + ">"
    params = SIGNATURES[name]
    decl = ",\n    ".join(f"{ty} {arg}" for ty, arg in params)
    casts = ", ".join(f"static_cast<{ty}>(args[{i}])" for i, (ty, _) in enumerate(params))
    lines = [
        f"{tdecl}\nvoid {name}(\n    {decl},\n    uint3 thread_position_in_grid) {{",
        f'#include "{name}.metal"',
        "}",
        f"{tdecl}\nvoid run_{name}(void** args, const uint* grid) {{",
        "  for (uint z = 0; z < grid[2]; ++z)",
        "    for (uint y = 0; y < grid[1]; ++y)",
        "      for (uint x = 0; x < grid[0]; ++x)",
        f"        {name}<{', '.join(tparams)}>({casts}, uint3{{x, y, z}});",
        "}",
    ]
    types = TEMPLATE_TYPES[name]
    for combo in itertools.product(*(types[t] for t in tparams)):
        symbol = name + "".join(f"__{dtype}" for dtype, _, _ in combo)
        cpp = ", ".join(cpp for _, cpp, _ in combo)
        lines.append(
            f'extern "C" void {symbol}(void** args, const uint* grid) '
            f"{{ run_{name}<{cpp}>(args, grid); }}"
        )
    return "\n".join(lines)


class CppKernels:
    """Runs a ``kernel_launch`` on the C++ build, as ``mx.fast.metal_kernel`` would."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def __call__(self, name: str, launch: dict) -> list[mx.array]:
        spec = KERNELS[name]
        inputs = dict(zip(spec.inputs, launch["inputs"]))
        dtypes = launch["output_dtypes"]
        outputs = {
            out: np.zeros(shape, dtype=_NP_WORDS[dtype.size])
            for out, shape, dtype in zip(spec.outputs, launch["output_shapes"], dtypes)
        }
        args = []
        for _, arg in SIGNATURES[name]:
            if arg in inputs:
                args.append(_bits(inputs[arg]))
            elif arg in outputs:
                args.append(outputs[arg])
            else:  # <input>_shape
                args.append(np.array(inputs[arg[: -len("_shape")]].shape, np.int32))
        pointers = (ctypes.c_void_p * len(args))(*(a.ctypes.data for a in args))
        grid = (ctypes.c_uint * 3)(*launch["grid"])
        getattr(self.lib, _symbol(name, launch["template"]))(pointers, grid)
        return [
            mx.array(outputs[out]).view(dtype) for out, dtype in zip(spec.outputs, dtypes)
        ]


@pytest.fixture(scope="session")
def cpp_kernels(tmp_path_factory) -> CppKernels:
    """Compile the kernel bodies (as ``gather_metal`` reads them) once per session."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    build = tmp_path_factory.mktemp("metal_as_cpp")
    for name in KERNELS:
        (build / f"{name}.metal").write_text(kernel_source(name))
    source = build / "kernels.cpp"
    source.write_text(
        '#include "metal_shim.h"\n\n' + "\n\n".join(_cpp_kernel(n) for n in KERNELS) + "\n"
    )
    library = build / "kernels.so"
    command = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wextra"]
    command += ["-Werror", f"-I{TESTS}", f"-I{build}", str(source), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return CppKernels(ctypes.CDLL(str(library)))


# --- random banks --------------------------------------------------------------


def _indices(rng: np.random.Generator, layers: int, d_ff: int, k: int) -> mx.array:
    """Ascending distinct channels per layer, ``[L, k]`` uint32."""
    rows = [np.sort(rng.choice(d_ff, size=k, replace=False)) for _ in range(layers)]
    return mx.array(np.stack(rows).astype(np.uint32))


def _records(rng: np.random.Generator, layers: int, d_ff: int, d: int) -> mx.array:
    return mx.array(rng.standard_normal((layers, d_ff, 3, d)).astype(np.float32))


def _float_bank(seed: int, layers: int, d_ff: int, d: int, dtype: mx.Dtype) -> Bank:
    return Bank(_records(np.random.default_rng(seed), layers, d_ff, d).astype(dtype))


def _quantized_bank(
    seed: int, layers: int, d_ff: int, d: int, bits: int, group_size: int, dtype: mx.Dtype
) -> Bank:
    records = _records(np.random.default_rng(seed), layers, d_ff, d) * 0.1
    weight, scales, biases = quantize_records(records.astype(dtype), bits, group_size)
    return Bank(weight, scales, biases, bits=bits, group_size=group_size)


# Every CompactFFN field a kernel can write (the quantized kernel writes them all).
FIELDS = KERNELS["gather_quantized_records"].outputs


def assert_same_bits(a: CompactFFN, b: CompactFFN) -> None:
    assert (a.bits, a.group_size) == (b.bits, b.group_size)
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, field
            np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=field)


# (layers, d_ff, d, k before rounding, dtype): k % 8 != 0, d % 64 != 0, odd rows.
FLOAT_CASES = [
    (1, 50, 40, 13, mx.float32),
    (3, 37, 96, 5, mx.float16),
    (2, 64, 200, 21, mx.bfloat16),
    (4, 24, 40, 24, mx.float16),  # k == d_ff
    (2, 20, 7, 3, mx.bfloat16),  # 14-byte rows: uint16 words
    (2, 20, 3, 9, mx.float32),  # 12-byte rows: uint32 words
]
# (layers, d_ff, d, k before rounding, bits, group_size, scales dtype)
QUANT_CASES = [
    (1, 40, 96, 13, 4, 32, mx.float32),
    (3, 33, 128, 9, 8, 64, mx.float16),
    (2, 24, 96, 5, 3, 32, mx.bfloat16),  # 9 words a row: uint32
    (2, 50, 192, 17, 4, 64, mx.float32),
    (2, 30, 96, 11, 6, 32, mx.float32),
    (1, 16, 64, 3, 2, 64, mx.float16),  # one group a row
]


def _float_case(i: int, case: tuple) -> tuple[Bank, mx.array]:
    layers, d_ff, d, k, dtype = case
    indices = _indices(np.random.default_rng(100 + i), layers, d_ff, round_k(k, d_ff))
    return _float_bank(i, layers, d_ff, d, dtype), indices


def _quant_case(i: int, case: tuple) -> tuple[Bank, mx.array]:
    layers, d_ff, d, k, bits, group_size, dtype = case
    indices = _indices(np.random.default_rng(200 + i), layers, d_ff, round_k(k, d_ff))
    return _quantized_bank(i, layers, d_ff, d, bits, group_size, dtype), indices


# --- the kernel bodies, compiled as C++, against the portable gather -----------


@pytest.mark.parametrize("i", range(len(FLOAT_CASES)))
def test_records_kernel_bit_exact(cpp_kernels, i):
    bank, indices = _float_case(i, FLOAT_CASES[i])
    name, launch = kernel_launch(bank, indices)
    assert name == "gather_records"
    compact = compact_from_outputs(bank, cpp_kernels(name, launch))
    assert_same_bits(compact, gather_portable(bank, indices))


@pytest.mark.parametrize("i", range(len(FLOAT_CASES)))
def test_records_kernel_native_types(cpp_kernels, i):
    """The body also works with T the bank's own float type (no word view)."""
    bank, indices = _float_case(i, FLOAT_CASES[i])
    name, launch = kernel_launch(bank, indices)
    launch = dict(
        launch,
        inputs=[bank.weight, launch["inputs"][1]],
        template=[("T", bank.weight.dtype)],
        grid=(bank.hidden_size, *launch["grid"][1:]),
        output_shapes=[s[:2] + (bank.hidden_size,) for s in launch["output_shapes"]],
        output_dtypes=[bank.weight.dtype] * 2,
    )
    compact = CompactFFN(*cpp_kernels(name, launch))
    assert_same_bits(compact, gather_portable(bank, indices))


@pytest.mark.parametrize("i", range(len(QUANT_CASES)))
def test_quantized_kernel_bit_exact(cpp_kernels, i):
    bank, indices = _quant_case(i, QUANT_CASES[i])
    name, launch = kernel_launch(bank, indices)
    assert name == "gather_quantized_records"
    compact = compact_from_outputs(bank, cpp_kernels(name, launch))
    assert_same_bits(compact, gather_portable(bank, indices))


def test_kernel_writes_every_output_element(cpp_kernels):
    """Outputs start as zeros in the C++ run, as garbage on Metal: poison the bank
    with ones everywhere and check no zero survives."""
    layers, d_ff, d, k = 2, 30, 40, round_k(11, 30)
    bank = Bank(mx.ones((layers, d_ff, 3, d), mx.float16))
    indices = _indices(np.random.default_rng(0), layers, d_ff, k)
    compact = compact_from_outputs(bank, cpp_kernels(*kernel_launch(bank, indices)))
    assert mx.all(compact.gate_up == 1).item() and mx.all(compact.down_t == 1).item()


def _generated_signature(capfd, tmp_path, name: str, launch: dict) -> tuple[str, list]:
    """The template line and parameters of the Metal source MLX generates, from a
    verbose trace (on Linux, exporting traces the call without running it)."""
    kernel = gather_mod._kernel(name)
    rest = {key: value for key, value in launch.items() if key != "inputs"}

    def call(*inputs):
        return kernel(inputs=list(inputs), **rest, verbose=True)

    capfd.readouterr()
    mx.export_function(str(tmp_path / f"{name}.mlxfn"), call, *launch["inputs"])
    text = capfd.readouterr().out
    match = re.search(r"(template <[^>]*>)\s*\[\[kernel\]\] void \w+\((.*?)\)\s*\{", text, re.S)
    assert match, text
    params = []
    for param in match.group(2).split(","):
        param = re.sub(r"\[\[.*?\]\]", "", param).strip()
        kind, arg = param.rsplit(" ", 1)
        params.append((kind, arg))
    return match.group(1), params


@pytest.mark.parametrize("quantized", [False, True])
def test_cpp_wrappers_match_generated_signature(capfd, tmp_path, quantized):
    if quantized:
        bank, indices = _quant_case(0, QUANT_CASES[0])
    else:
        bank, indices = _float_case(2, FLOAT_CASES[2])
    name, launch = kernel_launch(bank, indices)
    template, params = _generated_signature(capfd, tmp_path, name, launch)
    tparams = TEMPLATE_PARAMS[name]
    assert [t for t, _ in launch["template"]] == list(tparams)
    assert template == "template <" + ", ".join(f"typename {t}" for t in tparams) + ">"
    names = {t: METAL_TYPE_NAMES[_dtype_name(v)] for t, v in launch["template"]}
    expected = [
        (re.sub(r"\b[TQ]\b", lambda m: names[m.group(0)], kind), arg)
        for kind, arg in SIGNATURES[name]
    ]
    expected.append(("uint3", "thread_position_in_grid"))
    assert params == expected


def test_kernel_bodies_are_pure_bodies():
    """mx.fast.metal_kernel writes the signature; the files must not."""
    for name in KERNELS:
        source = kernel_source(name)
        assert "[[kernel]]" not in source and "#include" not in source
        assert "thread_position_in_grid" in source


# --- the portable gather and the dispatch ----------------------------------------


def _numpy_gather(bank: Bank, indices: mx.array) -> dict[str, np.ndarray]:
    """A plain per-layer reference, in raw bits."""
    idx = np.array(indices).astype(np.int64)
    sources = {"": bank.weight, "_scales": bank.scales, "_biases": bank.biases}
    ref = {}
    for suffix, a in sources.items():
        if a is None:
            continue
        bits = _bits(a)
        records = np.stack([bits[l, idx[l]] for l in range(idx.shape[0])])  # [L, k, 3, X]
        ref["gate_up" + suffix] = np.concatenate([records[:, :, 0], records[:, :, 1]], axis=1)
        ref["down_t" + suffix] = records[:, :, 2]
    return ref


@pytest.mark.parametrize("i", range(len(FLOAT_CASES) + len(QUANT_CASES)))
def test_portable_matches_numpy(i):
    if i < len(FLOAT_CASES):
        bank, indices = _float_case(i, FLOAT_CASES[i])
    else:
        j = i - len(FLOAT_CASES)
        bank, indices = _quant_case(j, QUANT_CASES[j])
    compact = gather_portable(bank, indices)
    assert compact.k == indices.shape[1] and compact.bits == bank.bits
    for field, expected in _numpy_gather(bank, indices).items():
        got = getattr(compact, field)
        source = bank.weight if field in ("gate_up", "down_t") else bank.scales
        assert got.dtype == source.dtype
        np.testing.assert_array_equal(_bits(got), expected, err_msg=field)


def test_portable_accepts_int32_indices():
    bank, indices = _float_case(0, FLOAT_CASES[0])
    assert_same_bits(
        gather_portable(bank, indices.astype(mx.int32)), gather_portable(bank, indices)
    )


def test_bad_indices_shape_raises():
    bank, indices = _float_case(1, FLOAT_CASES[1])
    with pytest.raises(ValueError):
        gather_portable(bank, indices[:1])
    with pytest.raises(ValueError):
        kernel_launch(bank, indices.reshape(-1))


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the non-Metal dispatch")
def test_gather_uses_portable_without_metal():
    assert gather_mod.BACKEND == "portable"
    assert gather_mod._gather is gather_portable
    bank, indices = _quant_case(1, QUANT_CASES[1])
    assert_same_bits(gather(bank, indices), gather_portable(bank, indices))


def test_kernels_are_created_once():
    for name in KERNELS:
        assert gather_mod._kernel(name) is gather_mod._kernel(name)


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the non-Metal error")
@pytest.mark.parametrize("quantized", [False, True])
def test_gather_metal_without_metal_raises(quantized):
    """The call is well formed up to the missing back-end."""
    bank, indices = _quant_case(0, QUANT_CASES[0]) if quantized else _float_case(0, FLOAT_CASES[0])
    with pytest.raises(RuntimeError, match="No Metal back-end"):
        gather_metal(bank, indices)


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal")
def test_gather_metal_bit_exact():
    cases = [_float_case(i, case) for i, case in enumerate(FLOAT_CASES)]
    cases += [_quant_case(i, case) for i, case in enumerate(QUANT_CASES)]
    for bank, indices in cases:
        assert_same_bits(gather_metal(bank, indices), gather_portable(bank, indices))


def test_threadgroup_sizes():
    for width, k in [(1, 1), (5, 3), (40, 16), (256, 8), (1000, 64), (3, 1000)]:
        x, y, z = gather_mod._threadgroup(width, k)
        assert 1 <= x * y * z <= 256 and x <= width and y <= max(k, 1)


@pytest.mark.parametrize(
    "k, d_ff, expected",
    [(1, 100, 8), (8, 100, 8), (9, 100, 16), (96, 100, 96), (97, 100, 100),
     (100, 100, 100), (500, 100, 100), (13, 10, 10), (3, 5, 5), (7, 8, 8)],
)
def test_round_k(k, d_ff, expected):
    assert round_k(k, d_ff) == expected


@pytest.mark.parametrize("k, d_ff", [(0, 100), (-3, 100), (5, 0)])
def test_round_k_rejects(k, d_ff):
    with pytest.raises(ValueError):
        round_k(k, d_ff)


# --- the compact math equals the dense FFN with unselected channels zeroed -----


def nn_silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def _dense_masked(x: mx.array, records: mx.array, indices: mx.array) -> mx.array:
    """Dense SwiGLU from the un-bundled gate/up/down ``[d_ff, d]``, ``[d, d_ff]``."""
    gate, up, down = records[:, 0], records[:, 1], records[:, 2].T
    mask = mx.zeros((records.shape[0],)).at[indices].add(1.0)
    h = nn_silu(x @ gate.T) * (x @ up.T) * mask
    return h @ down.T


def _compact_float(x: mx.array, gate_up: mx.array, down_t: mx.array) -> mx.array:
    g, u = mx.split(x @ gate_up.T, 2, axis=-1)
    return (nn_silu(g) * u) @ down_t


def _compact_quantized(x: mx.array, c: CompactFFN, l: int) -> mx.array:
    q = dict(group_size=c.group_size, bits=c.bits)
    h = mx.quantized_matmul(
        x, c.gate_up[l], c.gate_up_scales[l], c.gate_up_biases[l], transpose=True, **q
    )
    g, u = mx.split(h, 2, axis=-1)
    return mx.quantized_matmul(
        nn_silu(g) * u, c.down_t[l], c.down_t_scales[l], c.down_t_biases[l], transpose=False, **q
    )


def test_compact_math_float():
    layers, d_ff, d, k = 3, 50, 40, round_k(13, 50)
    bank = Bank(_records(np.random.default_rng(7), layers, d_ff, d) * 0.2)
    indices = _indices(np.random.default_rng(8), layers, d_ff, k)
    x = mx.random.normal((5, d), key=mx.random.key(9))
    compact = gather(bank, indices)
    for l in range(layers):
        got = _compact_float(x, compact.gate_up[l], compact.down_t[l])
        want = _dense_masked(x, bank.weight[l], indices[l])
        assert mx.abs(got - want).max().item() <= 1e-4


@pytest.mark.parametrize(
    "bits, group_size, d", [(4, 32, 96), (4, 64, 128), (8, 64, 128), (8, 32, 96)]
)
def test_compact_math_quantized(bits, group_size, d):
    layers, d_ff, k = 2, 48, round_k(13, 48)
    bank = _quantized_bank(11, layers, d_ff, d, bits, group_size, mx.float32)
    indices = _indices(np.random.default_rng(12), layers, d_ff, k)
    x = mx.random.normal((5, d), key=mx.random.key(13))
    compact = gather(bank, indices)
    for l in range(layers):
        records = mx.dequantize(
            bank.weight[l], bank.scales[l], bank.biases[l], group_size=group_size, bits=bits
        )
        got = _compact_quantized(x, compact, l)
        want = _dense_masked(x, records, indices[l])
        assert mx.abs(got - want).max().item() <= 1e-4
