// The handful of Metal names the kernel bodies in metal_kernels/ use, for
// compiling those same bodies as C++ (g++) and running them on the CPU.
//
// A test wraps a body in a C++ function template whose parameters carry the
// kernel's input, shape and output names, its template constants and
// `thread_position_in_grid`, and calls it once per grid point. The gathers only
// move bits, so half and bfloat16 need storage of the right size, no arithmetic.
#pragma once

// Standard headers first: the address-space macros below must not touch them.
#include <cstddef>
#include <cstdint>

// Metal address spaces: plain memory on the CPU.
#define device
#define constant
#define threadgroup
#define thread

using uint = unsigned int;
using ulong = unsigned long;

struct uint3 {
  uint x, y, z;
};

// MLX spells Metal's half as float16_t; bfloat16_t comes from MLX's headers.
using half = _Float16;
using float16_t = _Float16;
struct bfloat16_t {
  uint16_t bits;
};

static_assert(sizeof(half) == 2, "half must be 16 bits");
static_assert(sizeof(bfloat16_t) == 2, "bfloat16_t must be 16 bits");
