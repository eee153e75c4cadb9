"""The Metal gather: one ``mx.fast.metal_kernel`` dispatch for all layers.

For a quantized bank, words, scales and biases travel in the same dispatch; the
kernel writes straight into ``gate_up`` and ``down_t``: no per-layer launches,
no split copies. It must match ``ifp_mlx.model.bank.gather_rows`` bit for bit.

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

from ..model.bank import Bank, CompactFFN, compact

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


# --- Metal backend ----------------------------------------------------------


def kernel_source(name: str) -> str:
    """The body of kernel ``name``, read from the package's ``metal_kernels``."""
    path = resources.files("ifp_mlx.metal_kernels").joinpath(f"{name}.metal")
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _kernel(name: str) -> Any:
    """Create kernel ``name`` once; MLX compiles it on first use per signature
    (input and output dtypes, and which inputs are small enough for ``constant``)."""
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
    views them back as the bank's dtypes. No template types: the bodies index
    their inputs directly, so the signature MLX generates from the inputs'
    dtypes (and sizes: small inputs live in ``constant`` memory) is all they
    need. Each output takes the dtype of the input it copies, so scales and
    biases may differ (float16 scales with float32 biases).
    """
    L, k = indices.shape
    weight = _as_words(bank.weight)
    width = weight.shape[-1]
    if bank.quantized:
        name = "gather_quantized_records"
        groups = bank.scales.shape[-1]
        inputs = [weight, bank.scales, bank.biases, indices]
        grid_x = max(width, groups)
        shapes = [(L, 2 * k, width), (L, k, width)]
        shapes += [(L, 2 * k, groups), (L, 2 * k, groups)]
        shapes += [(L, k, groups), (L, k, groups)]
        dtypes = [weight.dtype] * 2 + [bank.scales.dtype, bank.biases.dtype] * 2
    else:
        name = "gather_records"
        inputs = [weight, indices]
        grid_x = width
        shapes = [(L, 2 * k, width), (L, k, width)]
        dtypes = [weight.dtype] * 2
    launch = dict(
        inputs=inputs,
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
    return compact(bank, words + list(outputs[2:]))


def gather_metal(bank: Bank, indices: mx.array) -> CompactFFN:
    """Gather with one Metal dispatch for all layers (Apple GPU only)."""
    name, launch = kernel_launch(bank, indices)
    return compact_from_outputs(bank, _kernel(name)(**launch))
