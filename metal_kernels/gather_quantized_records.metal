// Gather the selected channel records of an affine-quantized bank of every
// layer into the compact FFN, in one dispatch: packed words, scales and biases
// travel together.
//
// This file is a kernel BODY: mx.fast.metal_kernel generates the signature.
// Keep it plain enough to compile as C++ too (tests/metal_shim.h).
//
// Inputs:  weight [L, d_ff, 3, W] of Q    (packed words, W = d * bits / 32 uint32,
//                                          or half as many uint64)
//          scales, biases [L, d_ff, 3, G] of T   (G = d / group_size)
//          indices [L, k] uint32
// Outputs: gate_up [L, 2k, W], down_t [L, k, W] of Q
//          gate_up_scales, gate_up_biases [L, 2k, G] of T
//          down_t_scales, down_t_biases [L, k, G] of T
// Grid:    (max(W, G), k, L): thread x moves word x of the three rows and, while
//          x < G, scale and bias x too.

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
    const device Q* src = weight + record * W + x;
    gate_up[gate_row * W + x] = src[0];
    gate_up[up_row * W + x] = src[W];
    down_t[down_row * W + x] = src[2 * W];
}
if (x < G) {
    const device T* s = scales + record * G + x;
    const device T* b = biases + record * G + x;
    gate_up_scales[gate_row * G + x] = s[0];
    gate_up_scales[up_row * G + x] = s[G];
    down_t_scales[down_row * G + x] = s[2 * G];
    gate_up_biases[gate_row * G + x] = b[0];
    gate_up_biases[up_row * G + x] = b[G];
    down_t_biases[down_row * G + x] = b[2 * G];
}
