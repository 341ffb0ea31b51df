// Shared by every kdarch_C source, host and CUDA: the e4m3 rounding both sides must agree on, and small
// argument-check helpers in kdarch's message style ("<op>: <arg>: expected <what>, got <value>").
//
// Why one rounding function for the CPU and the GPU: quantisation must be bit-identical to the torch
// backend (torch's fp32 -> float8_e4m3fn cast: round to nearest even, saturating at +-448, NaN -> 0x7F with
// its sign) on every device, so the rounding is written once, branch-free, and compiled by g++ and nvcc.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace kdarch_C {

constexpr int kBlock = 128;       // tile width along a row (and tile height of 128x128 blocks)
constexpr float kE4m3Max = 448.f;
constexpr uint8_t kE4m3Nan = 0x7F;

KD_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
#endif
}

KD_HD float bits_f32(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

// fp32 -> e4m3fn byte, round to nearest even, |y| > 448 saturates to 448, NaN -> 0x7F (0xFF when negative).
// Branch-free so the CPU loops vectorise. Normal range (|y| >= 2^-6): round the 23-bit mantissa to 3 bits
// (the carry moves into the exponent by itself) and rebias 127 -> 7. Subnormals (|y| < 2^-6): k * 2^-9 with
// k = rne(|y| 2^9), rounded by the 2^23 magic add (exact for 0 <= t < 2^22; needs no fast-math).
KD_HD uint8_t e4m3_from_f32(float y) {
  const uint32_t b = f32_bits(y);
  const uint32_t sign = (b >> 24) & 0x80u;
  const uint32_t a = b & 0x7FFFFFFFu;
  uint32_t normal = ((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  normal = normal > 0x7Eu ? 0x7Eu : normal;  // also catches the unsigned wrap of the subnormal range
  float t = bits_f32(a) * 512.f;
  t = t < 16.f ? t : 16.f;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>((t + 8388608.f) - 8388608.f));
  uint32_t r = a >= 0x3C800000u ? normal : sub;
  r = (a > 0x7F800000u ? 0x7Fu : r) | sign;  // NaN keeps its sign bit, as in torch's cast
  return static_cast<uint8_t>(r);
}

// e4m3fn byte -> fp32 (exact): sign, 4-bit exponent (bias 7), 3-bit mantissa; 0x7F / 0xFF are NaN.
KD_HD float e4m3_to_f32(uint8_t q) {
  const uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
  const uint32_t e = (q >> 3) & 0xFu, m = q & 7u;
  if ((q & 0x7Fu) == 0x7Fu) return bits_f32(0x7FC00000u | sign);
  if (e == 0) {  // subnormal: m * 2^-9
    const float v = static_cast<float>(m) * (1.f / 512.f);
    return sign ? -v : v;
  }
  return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

// Smallest power of two >= s (the UE8M0-style scale), as kdarch.kernels.fp8_ref.pow2_ceil computes it with
// frexp: s = m 2^e, m in [0.5, 1); s itself when m == 0.5, else 2^e (so 0 -> 1, as there).
KD_HD float pow2_ceil(float s) {
  int e = 0;
  const float m = ::frexpf(s, &e);
  return m == 0.5f ? s : ::ldexpf(1.f, e);
}

KD_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kdarch_C

#if !defined(__CUDACC__)
#include <c10/util/Exception.h>
// "<op>: <arg>: expected <what>, got <value>" as kdarch.checks writes it (raised as a RuntimeError).
#define KD_CHECK(cond, op, arg, what, got) \
  TORCH_CHECK(cond, op, ": ", arg, ": expected ", what, ", got ", got)
#endif
