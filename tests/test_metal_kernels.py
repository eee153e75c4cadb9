"""The gather backends: Metal kernel bodies run as C++, the portable path, the dispatch.

Metal cannot run on Linux, so the tests compile the *same* kernel bodies that
``gather_metal`` hands to ``mx.fast.metal_kernel`` as C++ (through
``tests/metal_shim.h``), inside the very signature MLX generates for each launch
(read from a verbose trace, which works without Metal), run them on that launch
(inputs, grid, output shapes and dtypes) and compare the result bit for bit with
the portable gather, on every case ``ifp selftest`` checks on a Mac. Each body is
built twice, once with ``constant`` and once with ``device`` memory made distinct
from the other, so a body that binds an input to the wrong address space does
not compile here either.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ifp_mlx.errors import IFPError
from ifp_mlx.gather import backend as backend_mod
from ifp_mlx.gather import metal as gather_mod
from ifp_mlx.gather import selftest
from ifp_mlx.gather.metal import KERNELS, compact_from_outputs, gather_metal, kernel_launch, kernel_source
from ifp_mlx.gather.selftest import CASES, Case, case_inputs, describe, differing_fields, raw_bits
from ifp_mlx.model.bank import Bank, CompactFFN, check_indices
from ifp_mlx.model.bank import gather_rows as gather_portable
from ifp_mlx.select.base import round_k

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# The two builds of every body: which address space the shim makes strict.
MODES = {"constant": [], "device": ["-DMETAL_SHIM_STRICT_DEVICE"]}
FLOAT_IDS = [i for i, case in enumerate(CASES) if not case.quantized]
CASE_IDS = [describe(case) for case in CASES]


def assert_same_bits(got: CompactFFN, want: CompactFFN) -> None:
    assert differing_fields(got, want) == []


# --- the signature MLX generates -------------------------------------------------


def generated_source(name: str, launch: dict) -> str:
    """The Metal source MLX generates for this launch, from a verbose trace:
    exporting a function traces the kernel call without running it, so this
    works without Metal. MLX prints the source on file descriptor 1."""
    kernel = gather_mod._kernel(name)
    rest = {key: value for key, value in launch.items() if key != "inputs"}

    def call(*inputs):
        return kernel(inputs=list(inputs), **rest, verbose=True)

    sys.stdout.flush()
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryFile() as out:
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)
        try:
            mx.export_function(os.path.join(folder, "kernel.mlxfn"), call, *launch["inputs"])
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        return out.read().decode()


def signature(name: str, launch: dict) -> tuple[str, list[tuple[str, str]]]:
    """The generated kernel's function name and its ``(type, name)`` parameters."""
    text = generated_source(name, launch)
    match = re.search(r"\[\[kernel\]\] void (\w+)\((.*?)\)\s*\{", text, re.DOTALL)
    assert match, text
    params = []
    for param in match.group(2).split(","):
        kind, arg = re.sub(r"\[\[.*?\]\]", "", param).strip().rsplit(" ", 1)
        params.append((kind, arg))
    return match.group(1), params


# --- the C++ build of the kernel bodies ----------------------------------------


def cpp_function(name: str, function: str, params: list[tuple[str, str]]) -> str:
    """The body inside its generated signature, and a C entry point looping over the grid."""
    decl = ",\n    ".join(f"{kind} {arg}" for kind, arg in params)
    casts = ", ".join(f"static_cast<{kind}>(args[{i}])" for i, (kind, _) in enumerate(params[:-1]))
    return "\n".join([
        f"void {function}(\n    {decl}) {{",
        f'#include "{name}.metal"',
        "}",
        f'extern "C" void run_{function}(void** args, const uint* grid) {{',
        "  for (uint z = 0; z < grid[2]; ++z)",
        "    for (uint y = 0; y < grid[1]; ++y)",
        "      for (uint x = 0; x < grid[0]; ++x)",
        f"        {function}({casts}, uint3{{x, y, z}});",
        "}",
    ])


def compile_functions(folder: Path, bodies: dict[str, str], functions: list[tuple]) -> dict[str, tuple[int, str]]:
    """Build ``(name, function, params)`` from ``bodies`` (kernel name -> text) in
    both modes, in parallel, as ``folder/<mode>.so``; each mode's exit status and errors."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        (folder / f"{name}.metal").write_text(body)
    source = folder / "kernels.cpp"
    code = "\n\n".join(cpp_function(*function) for function in functions)
    source.write_text(f'#include "metal_shim.h"\n\n{code}\n')
    command = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror"]
    command += [f"-I{TESTS}", f"-I{folder}", str(source)]
    runs = {
        mode: subprocess.Popen(command + flags + ["-o", str(folder / f"{mode}.so")], stderr=subprocess.PIPE, text=True)
        for mode, flags in MODES.items()
    }
    return {mode: (run.wait(), run.stderr.read()) for mode, run in runs.items()}


class CppKernels:
    """Runs a ``kernel_launch`` on the C++ builds, as ``mx.fast.metal_kernel`` would."""

    def __init__(self, folder: Path):
        self.folder, self.libraries, self.builds = folder, {}, 0

    def prepare(self, launches: list[tuple[str, dict]]) -> None:
        """Build, in one go, every generated signature of ``launches`` not built yet."""
        missing = {}
        for name, launch in launches:
            function, params = signature(name, launch)
            if function not in self.libraries:
                missing[function] = (name, function, params)
        if missing:
            self._build(list(missing.values()))

    def _build(self, functions: list[tuple]) -> None:
        folder = self.folder / f"build{self.builds}"
        self.builds += 1
        bodies = {name: kernel_source(name) for name in KERNELS}
        for mode, (status, errors) in compile_functions(folder, bodies, functions).items():
            assert status == 0, f"{mode} build:\n{errors}"
        libraries = {mode: ctypes.CDLL(str(folder / f"{mode}.so")) for mode in MODES}
        self.libraries.update({function: libraries for _, function, _ in functions})

    def __call__(self, name: str, launch: dict) -> list[mx.array]:
        function, params = signature(name, launch)
        if function not in self.libraries:
            self._build([(name, function, params)])
        libraries = self.libraries[function].values()
        runs = [self._run(library, function, params, name, launch) for library in libraries]
        for other in runs[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(runs[0], other)), "the two builds disagree"
        return [mx.array(a).view(dtype) for a, dtype in zip(runs[0], launch["output_dtypes"])]

    @staticmethod
    def _run(library: ctypes.CDLL, function: str, params: list, name: str, launch: dict) -> list[np.ndarray]:
        """One build's outputs, as raw words, for the launch."""
        spec = KERNELS[name]
        inputs = dict(zip(spec.inputs, launch["inputs"]))
        outputs = {
            out: np.zeros(shape, dtype=f"uint{8 * dtype.size}")
            for out, shape, dtype in zip(spec.outputs, launch["output_shapes"], launch["output_dtypes"])
        }
        args = []
        for _, arg in params[:-1]:
            if arg in inputs:
                args.append(raw_bits(inputs[arg]))
            elif arg in outputs:
                args.append(outputs[arg])
            else:
                assert arg.endswith("_shape"), arg
                args.append(np.array(inputs[arg[: -len("_shape")]].shape, np.int32))
        assert params[-1][1] == "thread_position_in_grid", params
        pointers = (ctypes.c_void_p * len(args))(*(a.ctypes.data for a in args))
        getattr(library, f"run_{function}")(pointers, (ctypes.c_uint * 3)(*launch["grid"]))
        return [outputs[out] for out in spec.outputs]


def native_launch(bank: Bank, indices: mx.array) -> tuple[str, dict]:
    """The records kernel on the bank's own float type, not viewed as words."""
    name, launch = kernel_launch(bank, indices)
    d = bank.hidden_size
    return name, dict(
        launch,
        inputs=[bank.weight, launch["inputs"][1]],
        grid=(d, *launch["grid"][1:]),
        output_shapes=[s[:2] + (d,) for s in launch["output_shapes"]],
        output_dtypes=[bank.weight.dtype] * 2,
    )


@pytest.fixture(scope="session")
def cpp_kernels(tmp_path_factory) -> CppKernels:
    """The kernel bodies (as ``gather_metal`` reads them), built once for every case."""
    assert shutil.which("g++"), "the C++ build of the Metal kernels needs g++"
    kernels = CppKernels(tmp_path_factory.mktemp("metal_as_cpp"))
    inputs = [case_inputs(i, case) for i, case in enumerate(CASES)]
    launches = [kernel_launch(*pair) for pair in inputs]
    launches += [native_launch(*inputs[i]) for i in FLOAT_IDS]
    kernels.prepare(launches)
    return kernels


# --- the kernel bodies, compiled as C++, against the portable gather -----------


@pytest.mark.parametrize("i", range(len(CASES)), ids=CASE_IDS)
def test_kernel_bit_exact(cpp_kernels, i):
    bank, indices = case_inputs(i, CASES[i])
    name, launch = kernel_launch(bank, indices)
    assert name == ("gather_quantized_records" if bank.quantized else "gather_records")
    compact = compact_from_outputs(bank, cpp_kernels(name, launch))
    assert_same_bits(compact, gather_portable(bank, indices))


@pytest.mark.parametrize("i", FLOAT_IDS, ids=[CASE_IDS[i] for i in FLOAT_IDS])
def test_records_kernel_native_types(cpp_kernels, i):
    """The body also works on the bank's own float type (no word view)."""
    bank, indices = case_inputs(i, CASES[i])
    compact = CompactFFN(*cpp_kernels(*native_launch(bank, indices)))
    assert_same_bits(compact, gather_portable(bank, indices))


@pytest.mark.parametrize("quantized", [False, True])
def test_kernel_writes_every_output_element(cpp_kernels, quantized):
    """Outputs start as zeros in the C++ run, as garbage on Metal: a bank of ones
    everywhere must leave no zero behind."""
    layers, d_ff, d, k = 2, 30, 64, 11
    rows = (layers, d_ff, 3)
    bank = Bank(mx.ones((*rows, d), mx.float16))
    if quantized:
        scales, biases = mx.ones((*rows, 2), mx.float16), mx.ones((*rows, 2), mx.float32)
        bank = Bank(mx.ones((*rows, 8), mx.uint32), scales, biases, bits=4, group_size=32)
    indices = selftest.case_indices(Case(layers, d_ff, d, k, mx.float16), seed=0)
    compact = compact_from_outputs(bank, cpp_kernels(*kernel_launch(bank, indices)))
    assert all(mx.all(a == 1).item() for a in compact.arrays())


def test_small_inputs_are_passed_in_constant_memory():
    """Why the bodies name no address space (or type): MLX puts an input of fewer
    than 8 elements in ``constant`` memory, and each output takes its own dtype."""
    case = Case(1, 2, 64, 1, mx.float32, 4, 64, mx.float16)  # 24 words, 6 scales, 1 index
    _, params = signature(*kernel_launch(selftest.case_bank(case, 0), selftest.case_indices(case, 0)))
    kinds = {arg: kind for kind, arg in params}
    assert kinds["weight"] == "const device uint64_t*"
    assert kinds["scales"] == "const constant float*"
    assert kinds["biases"] == "const constant float16_t*"
    assert kinds["indices"] == "const constant uint32_t*"
    assert kinds["gate_up_scales"] == kinds["down_t_scales"] == "device float*"
    assert kinds["gate_up_biases"] == kinds["down_t_biases"] == "device float16_t*"


@pytest.mark.parametrize(
    "mode, shape, wrong, right",
    [
        # L=1, k=1: every input under 8 elements, passed as `const constant`
        ("constant", (1, 1, 2, 1), "const device uint32_t*", "const constant uint32_t*"),
        # k=13 indices and a 50-channel bank: both passed as `const device`
        ("device", (1, 50, 40, 13), "const constant uint32_t*", "const device uint32_t*"),
    ],
)
def test_wrong_address_space_does_not_compile(tmp_path, mode, shape, wrong, right):
    """The shim keeps constant and device memory apart, as Metal does: binding the
    indices to a pointer of the wrong space fails to build, the right one builds."""
    case = Case(*shape, mx.float32)
    name, launch = kernel_launch(selftest.case_bank(case, 0), selftest.case_indices(case, 0))
    function, params = signature(name, launch)
    results = {}
    for binding in (wrong, right):
        body = f"{binding} bound = indices;\n(void)bound;\n" + kernel_source(name)
        folder = tmp_path / str(len(results))
        results[binding] = compile_functions(folder, {name: body}, [(name, function, params)])[mode]
    (right_status, right_errors), (wrong_status, wrong_errors) = results[right], results[wrong]
    assert right_status == 0, right_errors
    assert wrong_status != 0 and "invalid conversion" in wrong_errors and "volatile" in wrong_errors


def test_kernel_bodies_are_pure_bodies():
    """mx.fast.metal_kernel writes the signature; the files must not. Nor may the
    code name an address space: the shim cannot catch ``const device auto*``."""
    for name in KERNELS:
        source = kernel_source(name)
        assert "[[kernel]]" not in source and "#include" not in source
        assert "thread_position_in_grid" in source
        code = "\n".join(line.split("//")[0] for line in source.splitlines())
        assert not re.search(r"\b(device|constant)\b", code), name


# --- the portable gather and the dispatch ----------------------------------------


@pytest.mark.parametrize("i", range(len(CASES)), ids=CASE_IDS)
def test_portable_matches_numpy(i):
    bank, indices = case_inputs(i, CASES[i])
    compact = gather_portable(bank, indices)
    assert compact.k == indices.shape[1] and compact.bits == bank.bits
    assert_same_bits(compact, selftest.reference_gather(bank, indices))


def test_portable_accepts_int32_indices():
    bank, indices = case_inputs(2, CASES[2])
    assert_same_bits(gather_portable(bank, indices.astype(mx.int32)), gather_portable(bank, indices))


def test_bad_indices_shape_raises():
    """The gathers trust their indices: the shape is refused where a selection enters."""
    bank, indices = case_inputs(9, CASES[9])  # L=3
    assert check_indices(indices, bank.num_layers, bank.d_ff).dtype == mx.uint32
    for bad in (indices[:1], indices.reshape(-1), indices[:, :0]):
        with pytest.raises(IFPError, match="must be"):
            check_indices(bad, bank.num_layers, bank.d_ff)


def test_backend_follows_metal_availability():
    expected = "metal" if mx.metal.is_available() else "portable"
    assert backend_mod.available_backend() == expected
    assert backend_mod.backend() == expected and backend_mod.fallback_reason() is None
    bank, indices = case_inputs(40, CASES[40])
    assert_same_bits(backend_mod.gather(bank, indices), gather_portable(bank, indices))


def _compile_failure(*args, **kwargs):
    raise RuntimeError(
        "[metal::Device] Unable to build metal library from source\n"
        "program_source:12:5: error: cannot initialize a variable of type 'const device uint *'\n"
        "program_source:20:1: error: another error"
    )


def test_failing_kernel_falls_back_once(monkeypatch, capfd):
    """Forced to Metal where the kernel cannot run (on Linux the call raises
    "No Metal back-end"; on a Mac a compile failure is faked), gathers fall
    back to the portable path with exactly one warning line."""
    monkeypatch.setitem(backend_mod._state, "backend", backend_mod.METAL)
    monkeypatch.setitem(backend_mod._state, "fallback_reason", None)
    if mx.metal.is_available():
        monkeypatch.setattr(backend_mod, "gather_metal", _compile_failure)
    capfd.readouterr()
    for i in (2, 40):
        bank, indices = case_inputs(i, CASES[i])
        assert_same_bits(backend_mod.gather(bank, indices), gather_portable(bank, indices))
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the Metal gather kernel failed")
    assert backend_mod.backend() == "portable" and backend_mod.fallback_reason() in lines[0]
    if not mx.metal.is_available():
        assert "No Metal back-end" in lines[0]


def test_compile_failure_is_one_line():
    with pytest.raises(RuntimeError) as caught:
        _compile_failure()
    line = backend_mod.one_line(caught.value)
    assert "\n" not in line and line.startswith("[metal::Device] Unable to build")
    assert "cannot initialize" in line and "another error" not in line


def test_kernels_are_created_once():
    for name in KERNELS:
        assert gather_mod._kernel(name) is gather_mod._kernel(name)


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the non-Metal error")
@pytest.mark.parametrize("i", [2, 40])
def test_gather_metal_without_metal_raises(i):
    """The call is well formed up to the missing back-end."""
    with pytest.raises(RuntimeError, match="No Metal back-end"):
        gather_metal(*case_inputs(i, CASES[i]))


def test_threadgroup_sizes():
    for width, k in [(1, 1), (5, 3), (40, 16), (256, 8), (1000, 64), (3, 1000)]:
        x, y, z = gather_mod._threadgroup(width, k)
        assert 1 <= x * y * z <= 256 and x <= width and y <= max(k, 1)


# --- ifp selftest -------------------------------------------------------------------


def _ifp(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ifp_mlx.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_selftest_command():
    """The command a user runs; without Metal it checks the portable path and exits 0."""
    result = _ifp("selftest", "--layers", "2", "--rounds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    metal = mx.metal.is_available()
    assert lines[0].startswith(f"gather backend: {'metal' if metal else 'portable'}")
    if not metal:
        assert "no Metal back-end on this platform" in lines[0]
    cases = lines[1 : 1 + len(CASES)]
    assert [line.split()[0] for line in cases] == ["match"] * len(CASES)
    assert all(describe(case) in line for case, line in zip(CASES, cases))
    paths = ["portable"] + (["metal"] if metal else [])
    bandwidth = lines[1 + len(CASES) : -1]
    assert [line.split()[1] for line in bandwidth] == paths
    assert all(re.search(r"\d+\.\d GB/s", line) for line in bandwidth)
    assert lines[-1] == f"{len(CASES)} of {len(CASES)} cases match"


def test_selftest_bad_option_is_one_line():
    result = _ifp("selftest", "--bits", "7")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "--bits" in result.stderr


def test_selftest_reports_a_mismatch(monkeypatch):
    """A gather that drops a channel is caught, case by case, and fails the run."""

    def wrong(bank: Bank, indices: mx.array) -> CompactFFN:
        return gather_portable(bank, mx.zeros_like(indices))

    monkeypatch.setattr(selftest, "gather_rows", wrong)
    lines = []
    spec = selftest.BandwidthBank(layers=1, d_ff=64, d=64, bits=16)
    assert not selftest.run_selftest(lines.append, spec, rounds=1)
    mismatched = [line for line in lines if line.startswith("MISMATCH")]
    assert mismatched and all("portable!=numpy (gate_up, down_t" in line for line in mismatched)
    assert lines[-1] == f"{len(CASES) - len(mismatched)} of {len(CASES)} cases match"


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
    h = mx.quantized_matmul(x, c.gate_up[l], c.gate_up_scales[l], c.gate_up_biases[l], transpose=True, **q)
    g, u = mx.split(h, 2, axis=-1)
    return mx.quantized_matmul(
        nn_silu(g) * u, c.down_t[l], c.down_t_scales[l], c.down_t_biases[l], transpose=False, **q
    )


def test_compact_math_float():
    case = Case(3, 50, 40, round_k(13, 50), mx.float32)
    bank = Bank(selftest.case_bank(case, seed=7).weight * 0.2)
    indices = selftest.case_indices(case, seed=8)
    x = mx.random.normal((5, case.d), key=mx.random.key(9))
    compact = backend_mod.gather(bank, indices)
    for l in range(case.layers):
        got = _compact_float(x, compact.gate_up[l], compact.down_t[l])
        want = _dense_masked(x, bank.weight[l], indices[l])
        assert mx.abs(got - want).max().item() <= 1e-4


@pytest.mark.parametrize("bits, group_size, d", [(4, 32, 96), (4, 64, 128), (8, 64, 128), (8, 32, 96)])
def test_compact_math_quantized(bits, group_size, d):
    case = Case(2, 48, d, round_k(13, 48), mx.float32, bits, group_size, mx.float32)
    bank = selftest.case_bank(case, seed=11)
    indices = selftest.case_indices(case, seed=12)
    x = mx.random.normal((5, d), key=mx.random.key(13))
    compact = backend_mod.gather(bank, indices)
    for l in range(case.layers):
        records = mx.dequantize(bank.weight[l], bank.scales[l], bank.biases[l], group_size=group_size, bits=bits)
        got = _compact_quantized(x, compact, l)
        want = _dense_masked(x, records, indices[l])
        assert mx.abs(got - want).max().item() <= 1e-4
