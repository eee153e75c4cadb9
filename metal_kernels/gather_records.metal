// Gather the selected channel records of every layer into the compact FFN,
// in one dispatch, writing straight into the outputs (no split copies).
//
// This file is a kernel BODY: mx.fast.metal_kernel generates the signature.
// Keep it plain enough to compile as C++ too (tests/metal_shim.h).
//
// Inputs:  records [L, d_ff, 3, W]   (slot 0 gate row, 1 up row, 2 down column)
//          indices [L, k] uint32      (selected channels, each < d_ff)
// Outputs: gate_up [L, 2k, W]         (rows 0..k-1 gate, rows k..2k-1 up)
//          down_t  [L, k, W]          (same element type as records)
// Grid:    (W, k, L), one thread per (word of a row, selected channel, layer).
//
// The body names no element type and no address space: MLX passes an input
// with fewer than 8 elements as `const constant T*` and a larger one as
// `const device T*`, and the element type is whatever the caller passes (the
// gather only moves bits, so rows may travel as wider words, uint64 for
// 8-byte multiples). Indexing the inputs directly compiles either way. Sizes
// come from the shapes, not template constants, so one compiled kernel serves
// every k. Offsets are size_t: a large model's bank has more than 2^32 elements.

const uint w = thread_position_in_grid.x;
const uint i = thread_position_in_grid.y;
const uint l = thread_position_in_grid.z;

const size_t d_ff = records_shape[1];
const size_t W = records_shape[3];
const size_t k = indices_shape[1];
if (w >= W || i >= k) {
    return;
}

const size_t channel = indices[size_t(l) * k + i];
const size_t src = (size_t(l) * d_ff + channel) * 3 * W + w;
const size_t gate_row = size_t(l) * 2 * k + i;

gate_up[gate_row * W + w] = records[src];
gate_up[(gate_row + k) * W + w] = records[src + W];
down_t[(size_t(l) * k + i) * W + w] = records[src + 2 * W];
