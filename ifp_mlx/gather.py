"""Gather the selected FFN channels of every layer from the bank.

Two backends produce the same :class:`CompactFFN`, bit for bit:

- **metal**: one ``mx.fast.metal_kernel`` dispatch for all layers (and, for a
  quantized bank, for words, scales and biases together) that writes straight
  into ``gate_up`` and ``down_t``: no per-layer launches, no split copies.
- **portable** (CPU, CUDA): two row gathers (``mx.take`` along axis 0) per array
  of the bank seen as ``[L * d_ff * 3, W]`` rows.

The backend is chosen once, from ``mx.metal.is_available()``: creating a Metal
kernel works everywhere, but calling one without Metal raises, and catching that
would hide real kernel errors.

The kernel bodies live in ``metal_kernels/*.metal`` (shipped as package data) so
the tests can compile the same text as C++ and check it on machines without
Metal. ``kernel_launch`` and ``compact_from_outputs`` are the two halves of
``gather_metal`` around the kernel call; the tests run the C++ build of the
kernel between them.
"""

from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

import mlx.core as mx

from .bank import DOWN, GATE, UP, Bank, CompactFFN

# Threads per threadgroup: a copy kernel only needs enough to hide latency.
_THREADS = 256

# Unsigned words, widest first: the gather moves bits, and wider words mean
# fewer threads and fewer, larger memory transactions.
_WORDS = (mx.uint64, mx.uint32, mx.uint16, mx.uint8)


class KernelSpec(NamedTuple):
    """The parameter names of a kernel; its body is ``metal_kernels/<name>.metal``."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


KERNELS = {
    "gather_records": KernelSpec(("records", "indices"), ("gate_up", "down_t")),
    "gather_quantized_records": KernelSpec(
        ("weight", "scales", "biases", "indices"),
        (
            "gate_up",
            "down_t",
            "gate_up_scales",
            "gate_up_biases",
            "down_t_scales",
            "down_t_biases",
        ),
    ),
}


def round_k(k: int, d_ff: int) -> int:
    """Round k up to a multiple of 8, capped at d_ff.

    Metal's fast quantized mat-vec wants the output size N % 8 == 0, and the
    compact ``gate_up`` has N = 2k, ``down_t`` is used with K = k. A cap at
    d_ff keeps k a valid selection size (the dense model).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if d_ff < 1:
        raise ValueError(f"d_ff must be at least 1, got {d_ff}")
    return min(-(-k // 8) * 8, d_ff)


def _check(bank: Bank, indices: mx.array) -> mx.array:
    """Validate the selection shape and return it as uint32 (the kernels' type)."""
    if indices.ndim != 2 or indices.shape[0] != bank.num_layers:
        raise ValueError(
            f"indices must be [L={bank.num_layers}, k], got {tuple(indices.shape)}"
        )
    if bank.quantized and (bank.scales is None or bank.biases is None):
        raise ValueError("a quantized bank needs scales and biases")
    if indices.dtype != mx.uint32:
        indices = indices.astype(mx.uint32)
    return indices


def _compact(bank: Bank, arrays: list[mx.array]) -> CompactFFN:
    """Wrap gathered arrays, in ``KERNELS`` output order (= CompactFFN field
    order: gate_up, down_t, gate_up_scales, gate_up_biases, down_t_scales,
    down_t_biases), as a CompactFFN."""
    if not bank.quantized:
        return CompactFFN(*arrays)
    return CompactFFN(*arrays, bits=bank.bits, group_size=bank.group_size)


# --- portable backend -------------------------------------------------------


def _record_rows(indices: mx.array, d_ff: int) -> tuple[mx.array, mx.array]:
    """Row numbers, in the bank seen as ``[L * d_ff * 3, W]``, of the selected
    gate and up rows ``[L, 2k]`` and down rows ``[L, k]``."""
    layers = mx.arange(indices.shape[0], dtype=mx.uint32)[:, None]
    record = (indices + layers * d_ff) * 3
    gate_up = mx.concatenate([record + GATE, record + UP], axis=1)
    return gate_up, record + DOWN


def _take_rows(a: mx.array, rows: mx.array) -> mx.array:
    """``[L, d_ff, 3, X]`` -> ``[L, n, X]``: one row gather, no split copies."""
    return mx.take(a.reshape(-1, a.shape[-1]), rows, axis=0)


def gather_portable(bank: Bank, indices: mx.array) -> CompactFFN:
    """Gather with ``mx.take`` (any device); bit-exact with ``gather_metal``."""
    indices = _check(bank, indices)
    gate_up, down = _record_rows(indices, bank.d_ff)
    arrays = [_take_rows(bank.weight, gate_up), _take_rows(bank.weight, down)]
    if bank.quantized:
        arrays += [_take_rows(bank.scales, gate_up), _take_rows(bank.biases, gate_up)]
        arrays += [_take_rows(bank.scales, down), _take_rows(bank.biases, down)]
    return _compact(bank, arrays)


def dense_ffn(bank: Bank) -> CompactFFN:
    """Every channel in order: the dense model, in the compact layout."""
    indices = mx.broadcast_to(mx.arange(bank.d_ff, dtype=mx.uint32), (bank.num_layers, bank.d_ff))
    return gather_portable(bank, indices)


# --- Metal backend ----------------------------------------------------------


def kernel_source(name: str) -> str:
    """The body of kernel ``name``, read from the package's ``metal_kernels``."""
    path = resources.files("ifp_mlx.metal_kernels").joinpath(f"{name}.metal")
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _kernel(name: str) -> Any:
    """Create kernel ``name`` once; MLX compiles it on first use per template."""
    spec = KERNELS[name]
    return mx.fast.metal_kernel(
        name=f"ifp_{name}",
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=kernel_source(name),
    )


def _as_words(a: mx.array) -> mx.array:
    """View the rows of ``a`` as the widest unsigned words that tile them."""
    row_bytes = a.shape[-1] * a.dtype.size
    word = next(w for w in _WORDS if row_bytes % w.size == 0)
    return a if a.dtype == word else a.view(word)


def _threadgroup(width: int, k: int) -> tuple[int, int, int]:
    """Threads along the row first (coalesced), then over selected channels."""
    x = min(width, _THREADS)
    return (x, max(1, min(k, _THREADS // x)), 1)


def kernel_launch(bank: Bank, indices: mx.array) -> tuple[str, dict[str, Any]]:
    """The kernel name and the keyword arguments of its call for this gather.

    Rows travel as unsigned words (see ``_as_words``); ``compact_from_outputs``
    views them back as the bank's dtypes.
    """
    indices = _check(bank, indices)
    L, k = indices.shape
    weight = _as_words(bank.weight)
    width = weight.shape[-1]
    if bank.quantized:
        name = "gather_quantized_records"
        groups = bank.scales.shape[-1]
        inputs = [weight, bank.scales, bank.biases, indices]
        template = [("T", bank.scales.dtype), ("Q", weight.dtype)]
        grid_x = max(width, groups)
        shapes = [(L, 2 * k, width), (L, k, width)]
        shapes += [(L, 2 * k, groups), (L, 2 * k, groups)]
        shapes += [(L, k, groups), (L, k, groups)]
        dtypes = [weight.dtype] * 2 + [bank.scales.dtype] * 4
    else:
        name = "gather_records"
        inputs = [weight, indices]
        template = [("T", weight.dtype)]
        grid_x = width
        shapes = [(L, 2 * k, width), (L, k, width)]
        dtypes = [weight.dtype] * 2
    launch = dict(
        inputs=inputs,
        template=template,
        grid=(grid_x, k, L),
        threadgroup=_threadgroup(grid_x, k),
        output_shapes=shapes,
        output_dtypes=dtypes,
    )
    return name, launch


def compact_from_outputs(bank: Bank, outputs: list[mx.array]) -> CompactFFN:
    """The kernel's outputs as a CompactFFN, words viewed back as the bank's dtype."""
    dtype = bank.weight.dtype
    words = [o if o.dtype == dtype else o.view(dtype) for o in outputs[:2]]
    return _compact(bank, words + list(outputs[2:]))


def gather_metal(bank: Bank, indices: mx.array) -> CompactFFN:
    """Gather with one Metal dispatch for all layers (Apple GPU only)."""
    name, launch = kernel_launch(bank, indices)
    return compact_from_outputs(bank, _kernel(name)(**launch))


# --- dispatch ---------------------------------------------------------------

BACKEND = "metal" if mx.metal.is_available() else "portable"
_gather = gather_metal if BACKEND == "metal" else gather_portable


def gather(bank: Bank, indices: mx.array) -> CompactFFN:
    """Gather the selected channels ``indices [L, k]`` of every layer.

    Uses the backend picked at import (``BACKEND``). Indices must be < d_ff;
    ascending order keeps the compact rows in bank order (not required).
    """
    return _gather(bank, indices)
