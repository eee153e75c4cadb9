// The handful of Metal names the kernel bodies in metal_kernels/ use, for
// compiling those same bodies as C++ (g++) and running them on the CPU.
//
// A test wraps a body in the signature MLX generates for a launch (its
// `[[...]]` attributes dropped) and calls it once per grid point. The gathers
// only move bits, so half and bfloat16 need storage of the right size, no
// arithmetic.
#pragma once

// Standard headers first: the address-space macros below must not touch them.
#include <cstddef>
#include <cstdint>

// Metal address spaces. MLX passes an input with fewer than 8 elements as
// `const constant T*` and a larger one as `const device T*`; on a GPU a body
// that binds one to a pointer of the other space does not compile. C++ has no
// address spaces, so one of the two becomes `volatile`: converting a
// `const volatile T*` to a `const T*` is an error, while reading through it
// works. Each build makes one space strict, and the tests build both:
//   default:                     `constant` is volatile, so binding a constant
//                                input as `const device T*` fails;
//   METAL_SHIM_STRICT_DEVICE:    `device` is volatile, so binding a device
//                                input as `const constant T*` fails.
// `auto` slips through (`const device auto*` deduces the volatile), so the
// tests also check that the bodies spell no address space at all.
#ifdef METAL_SHIM_STRICT_DEVICE
#define device volatile
#define constant
#else
#define device
#define constant volatile
#endif
#define threadgroup
#define thread

using uint = unsigned int;
using ulong = unsigned long;

struct uint3 {
  uint x, y, z;
};

// MLX spells Metal's half as float16_t; bfloat16_t comes from MLX's headers.
// A scoped enum is a 16-bit scalar with no arithmetic: it copies through a
// volatile pointer (a struct would not) and refuses any math on it.
using half = _Float16;
using float16_t = _Float16;
enum class bfloat16_t : uint16_t {};

static_assert(sizeof(half) == 2, "half must be 16 bits");
static_assert(sizeof(bfloat16_t) == 2, "bfloat16_t must be 16 bits");
