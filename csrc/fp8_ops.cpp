// CPU kernels of FP8 (e4m3fn) quantisation in G x 128 tiles (G = 1: activations, G = 128: weights) and of
// dequantisation, bit-identical to kdarch.kernels.fp8_ref (the torch backend).
//
// Why compiled: the reference pads into a tile view, then runs aminmax, a NaN probe, a division, the cast and
// a select as separate passes; here each tile is read twice (amax, then scale + round) while it is in cache,
// one parallel task per run of tiles. Bit-identity rests on doing the same fp32 operations: amax = max |x|
// (as integers: |x|'s bits order like its value, and inf / NaN bits sort above every finite value, which
// also gives the poison test), scale = max(amax, floor) / 448 (optionally pow2_ceil'ed), q = rne(x / scale)
// with a true division, and e4m3_from_f32 (kdarch_C.h) rounding as torch's cast does.
//
// Legend: E experts (leading dim of weight stacks), R x C a matrix, G rows per scale group,
// RT = ceil(R/G), CT = ceil(C/128) tile counts.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>

#include "kdarch_C.h"

namespace kdarch_C {
namespace {

template <typename T>
inline float to_f32(T v) { return static_cast<float>(v); }
template <>
inline float to_f32<c10::BFloat16>(c10::BFloat16 v) { return bits_f32(static_cast<uint32_t>(v.x) << 16); }

// One G x 128 (or partial) tile: rows r0 <= r < r1, columns c0 <= c < c1 of a row-major [R, C] x.
template <typename scalar_t>
float quantize_tile(const scalar_t* x, uint8_t* q, int64_t C, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                    float amax_floor, bool pow2) {
  const int64_t w = c1 - c0;
  uint32_t amax_bits = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * C + c0;
    for (int64_t c = 0; c < w; ++c) amax_bits = std::max(amax_bits, f32_bits(to_f32(xr[c])) & 0x7FFFFFFFu);
  }
  if (amax_bits >= 0x7F800000u) {  // inf or NaN in the tile: poison it (NaN scale, every byte the e4m3 NaN)
    for (int64_t r = r0; r < r1; ++r) std::fill(q + r * C + c0, q + r * C + c1, kE4m3Nan);
    return std::numeric_limits<float>::quiet_NaN();
  }
  float s = std::max(bits_f32(amax_bits), amax_floor) / kE4m3Max;
  if (pow2) s = pow2_ceil(s);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * C + c0;
    uint8_t* qr = q + r * C + c0;
    for (int64_t c = 0; c < w; ++c) qr[c] = e4m3_from_f32(to_f32(xr[c]) / s);
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_cpu(const at::Tensor& x, int64_t group_rows, double amax_floor,
                                                    bool pow2_scale) {
  KD_CHECK(x.device().is_cpu(), "fp8_quantize", "x", "a CPU tensor", x.device());
  KD_CHECK((x.dim() == 2 || x.dim() == 3) && x.is_floating_point() && x.element_size() > 1, "fp8_quantize", "x",
           "a 2-D [R, C] or 3-D [E, R, C] fp32/bf16/fp16 tensor", 
           c10::str(x.scalar_type(), " tensor of shape ", x.sizes()));
  KD_CHECK(group_rows >= 1, "fp8_quantize", "group_rows", "an int >= 1", group_rows);
  const at::Tensor xc = x.contiguous();
  const int64_t E = x.dim() == 3 ? x.size(0) : 1, R = x.size(-2), C = x.size(-1);
  const int64_t G = group_rows, RT = cdiv(R, G), CT = cdiv(C, kBlock);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor s = x.dim() == 3 ? at::empty({E, RT, CT}, x.options().dtype(at::kFloat))
                              : at::empty({RT, CT}, x.options().dtype(at::kFloat));
  const float floor = static_cast<float>(amax_floor);
  uint8_t* q_ptr = reinterpret_cast<uint8_t*>(q.data_ptr());
  float* s_ptr = s.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 13) / (std::min(G, R) * kBlock));  // ~8K elements a task
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "fp8_quantize", [&] {
    const scalar_t* x_ptr = xc.data_ptr<scalar_t>();
    at::parallel_for(0, E * RT * CT, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e = i / (RT * CT), rt = (i / CT) % RT, ct = i % CT;
        const int64_t r0 = rt * G, c0 = ct * kBlock;
        s_ptr[i] = quantize_tile(x_ptr + e * R * C, q_ptr + e * R * C, C, r0, std::min(R, r0 + G), c0,
                                 std::min(C, c0 + kBlock), floor, pow2_scale);
      }
    });
  });
  return {q, s};
}

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_to_f32(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

at::Tensor fp8_dequantize_cpu(const at::Tensor& q, const at::Tensor& s, int64_t group_rows,
                              at::ScalarType out_dtype) {
  KD_CHECK(q.device().is_cpu() && s.device().is_cpu(), "fp8_dequantize", "q, s", "CPU tensors",
           c10::str(q.device(), " and ", s.device()));
  KD_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat8_e4m3fn, "fp8_dequantize", "q",
           "a 2-D float8_e4m3fn tensor", c10::str(q.scalar_type(), " tensor of shape ", q.sizes()));
  KD_CHECK(group_rows >= 1, "fp8_dequantize", "group_rows", "an int >= 1", group_rows);
  const int64_t R = q.size(0), C = q.size(1), G = group_rows, RT = cdiv(R, G), CT = cdiv(C, kBlock);
  KD_CHECK(s.dim() == 2 && s.size(0) == RT && s.size(1) == CT && s.scalar_type() == at::kFloat, "fp8_dequantize",
           "s", c10::str("a float32 tensor [", RT, ", ", CT, "]"),
           c10::str(s.scalar_type(), " tensor of shape ", s.sizes()));
  KD_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf, "fp8_dequantize",
           "out_dtype", "float32, bfloat16 or float16", out_dtype);
  // A transposed q (e.g. a weight's q.t() in the dX GEMM) gives a transposed out, as q.float() * s does in
  // torch: same values either way, but the layout decides which BLAS kernel the following matmul runs.
  const bool transposed = !q.is_contiguous() && q.stride(0) == 1 && q.stride(1) == R;
  const at::Tensor qc = transposed ? q : q.contiguous(), sc = s.contiguous();
  at::Tensor out = transposed ? at::empty_strided({R, C}, {1, R}, q.options().dtype(out_dtype))
                              : at::empty({R, C}, q.options().dtype(out_dtype));
  const uint8_t* q_ptr = reinterpret_cast<const uint8_t*>(qc.data_ptr());
  const float* s_ptr = sc.data_ptr<float>();
  const float* lut = e4m3_table().data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "fp8_dequantize", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    if (transposed) {  // memory order: column c of [R, C] is contiguous
      at::parallel_for(0, C, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(R, 1)), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const float* s_c = s_ptr + c / kBlock;
          for (int64_t r = 0; r < R; ++r) {
            out_ptr[c * R + r] = static_cast<scalar_t>(lut[q_ptr[c * R + r]] * s_c[(r / G) * CT]);
          }
        }
      });
      return;
    }
    at::parallel_for(0, R, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* s_r = s_ptr + (r / G) * CT;
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
          const float sc_t = s_r[c0 / kBlock];
          const int64_t c1 = std::min(C, c0 + kBlock);
          for (int64_t c = c0; c < c1; ++c) out_ptr[r * C + c] = static_cast<scalar_t>(lut[q_ptr[r * C + c]] * sc_t);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdarch_C, CPU, m) {
  m.impl("fp8_quantize", &fp8_quantize_cpu);
  m.impl("fp8_dequantize", &fp8_dequantize_cpu);
}

}  // namespace kdarch_C
