// Gather the selected channel records of an affine-quantized bank of every
// layer into the compact FFN, in one dispatch: packed words, scales and biases
// travel together.
//
// This file is a kernel BODY: mx.fast.metal_kernel generates the signature.
// Keep it plain enough to compile as C++ too (tests/metal_shim.h).
//
// Inputs:  weight [L, d_ff, 3, W]          (packed words, W = d * bits / 32
//                                           uint32, or half as many uint64)
//          scales, biases [L, d_ff, 3, G]  (G = d / group_size; each its own
//                                           float type: they need not match)
//          indices [L, k] uint32
// Outputs: gate_up [L, 2k, W], down_t [L, k, W]       (weight's type)
//          gate_up_scales [L, 2k, G], down_t_scales [L, k, G]  (scales' type)
//          gate_up_biases [L, 2k, G], down_t_biases [L, k, G]  (biases' type)
// Grid:    (max(W, G), k, L): thread x moves word x of the three rows and, while
//          x < G, scale and bias x too.
//
// The body names no element type and no address space: MLX passes an input
// with fewer than 8 elements as `const constant T*` and a larger one as
// `const device T*`, so the inputs are indexed directly.

const uint x = thread_position_in_grid.x;
const uint i = thread_position_in_grid.y;
const uint l = thread_position_in_grid.z;

const size_t d_ff = weight_shape[1];
const size_t W = weight_shape[3];
const size_t G = scales_shape[3];
const size_t k = indices_shape[1];
if (i >= k) {
    return;
}

const size_t record = (size_t(l) * d_ff + indices[size_t(l) * k + i]) * 3;
const size_t gate_row = size_t(l) * 2 * k + i;
const size_t up_row = gate_row + k;
const size_t down_row = size_t(l) * k + i;

if (x < W) {
    const size_t src = record * W + x;
    gate_up[gate_row * W + x] = weight[src];
    gate_up[up_row * W + x] = weight[src + W];
    down_t[down_row * W + x] = weight[src + 2 * W];
}
if (x < G) {
    const size_t src = record * G + x;
    gate_up_scales[gate_row * G + x] = scales[src];
    gate_up_scales[up_row * G + x] = scales[src + G];
    down_t_scales[down_row * G + x] = scales[src + 2 * G];
    gate_up_biases[gate_row * G + x] = biases[src];
    gate_up_biases[up_row * G + x] = biases[src + G];
    down_t_biases[down_row * G + x] = biases[src + 2 * G];
}
