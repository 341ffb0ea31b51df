// CPU kernels of the routed experts' SwiGLU, with the routing weight folded in: forward and backward.
//
// Why compiled: between the two expert GEMMs the torch backend spends a dozen elementwise passes over [M, I]
// fp32 tensors (sigmoid, silu, products, the weight's row sums, a concatenation), each one a fresh tensor of
// many MiB whose first touch costs as much as its arithmetic. Here the forward is one pass and the backward
// one pass that writes the [M, 2I] gradient in place of the concatenation and recomputes the activation the
// down projection's weight gradient needs. Arithmetic is fp32 in the torch backend's order; exp is a polynomial
// of its own and silu is g * sigmoid(g), so the two agree to fp32 rounding, not bit for bit.
//
// Legend: M rows (token copies in expert order), I expert width; h [M, 2I] = [gate | up] pre-activations,
// w [M] the rows' routing weights, a = silu(gate) * up, y = w * a the down projection's input.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "kdarch_C.h"

namespace kdarch_C {
namespace {

void check_rows(const char* op, const at::Tensor& h, const at::Tensor& w) {
  KD_CHECK(h.device().is_cpu() && w.device().is_cpu(), op, "h, w", "CPU tensors", h.device());
  KD_CHECK(h.dim() == 2 && h.size(1) % 2 == 0 && h.is_floating_point(), op, "h",
           "a float tensor [M, 2I] (gate columns, then up)", h.sizes());
  KD_CHECK(w.scalar_type() == at::kFloat && w.numel() == h.size(0), op, "w",
           c10::str("a float32 tensor of M=", h.size(0), " routing weights"), w.sizes());
}

constexpr int64_t kLanes = 16;

int64_t grain(int64_t I) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(I, 1)); }

// exp(x) in fp32 within a few ulp (Cephes' expf): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so r is
// exact), e^r by a degree-6 polynomial, 2^n put in the exponent bits. Adding 1.5 * 2^23 rounds x log2(e) to the
// integer n and leaves n in the sum's low mantissa bits. Branch- and call-free, so -O3 vectorises the loops
// below (libm's expf, a call per element, ran 3x slower than torch's vectorised passes).
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);  // 2^n stays a normal float
  const float t = x * 1.44269504088896341f + 12582912.f;
  const float n = t - 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof t);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  bits = (bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float g) { return 1.f / (1.f + exp_f32(-g)); }

at::Tensor swiglu_forward_cpu(const at::Tensor& h_M2I, const at::Tensor& w_M) {
  check_rows("swiglu_forward", h_M2I, w_M);
  const at::Tensor h = h_M2I.contiguous(), w = w_M.contiguous();
  const int64_t M = h.size(0), I = h.size(1) / 2;
  at::Tensor y = at::empty({M, I}, h.options());
  const float* w_ptr = w.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_forward", [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, grain(I), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* gate = h_ptr + m * 2 * I;
        const scalar_t* up = gate + I;
        scalar_t* y_row = y_ptr + m * I;
        const float wm = w_ptr[m];
        for (int64_t i = 0; i < I; ++i) {
          const float g = static_cast<float>(gate[i]);
          y_row[i] = static_cast<scalar_t>(g * sigmoid(g) * static_cast<float>(up[i]) * wm);
        }
      }
    });
  });
  return y;
}

// grad_y [M, I] fp32: the gradient of y = w * a. Returns (grad_h [M, 2I] in h's dtype, grad_w [M] fp32,
// y [M, I] in h's dtype, recomputed for the down projection's weight gradient).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_y_MI,
                                                                   const at::Tensor& h_M2I, const at::Tensor& w_M) {
  const char* op = "swiglu_backward";
  check_rows(op, h_M2I, w_M);
  const int64_t M = h_M2I.size(0), I = h_M2I.size(1) / 2;
  KD_CHECK(grad_y_MI.device().is_cpu() && grad_y_MI.scalar_type() == at::kFloat && grad_y_MI.dim() == 2 &&
               grad_y_MI.size(0) == M && grad_y_MI.size(1) == I,
           op, "grad_y", c10::str("a float32 CPU tensor [M=", M, ", I=", I, "]"), grad_y_MI.sizes());
  const at::Tensor h = h_M2I.contiguous(), w = w_M.contiguous(), gy = grad_y_MI.contiguous();
  at::Tensor grad_h = at::empty({M, 2 * I}, h.options());
  at::Tensor grad_w = at::empty({M}, w.options());
  at::Tensor y = at::empty({M, I}, h.options());
  const float* w_ptr = w.data_ptr<float>();
  const float* gy_ptr = gy.data_ptr<float>();
  float* gw_ptr = grad_w.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_backward", [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    scalar_t* gh_ptr = grad_h.data_ptr<scalar_t>();
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, grain(I), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* gate = h_ptr + m * 2 * I;
        const scalar_t* up = gate + I;
        const float* gy_row = gy_ptr + m * I;
        scalar_t* grad_gate = gh_ptr + m * 2 * I;
        scalar_t* grad_up = grad_gate + I;
        scalar_t* y_row = y_ptr + m * I;
        const float wm = w_ptr[m];
        auto at = [&](int64_t i) {  // one column: writes the gradients and y, returns grad_y * a
          const float g = static_cast<float>(gate[i]), u = static_cast<float>(up[i]);
          const float sig = sigmoid(g), silu = g * sig, a = silu * u;
          const float grad_a = gy_row[i] * wm;
          grad_gate[i] = static_cast<scalar_t>(grad_a * u * sig * (1.f + g * (1.f - sig)));
          grad_up[i] = static_cast<scalar_t>(grad_a * silu);
          y_row[i] = static_cast<scalar_t>(a * wm);
          return gy_row[i] * a;
        };
        // grad_w's row sum in kLanes fixed partial sums (a set order, so deterministic), which vectorise
        float part[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= I; i += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) part[j] += at(i + j);
        }
        for (int64_t j = 0; i < I; ++i, ++j) part[j] += at(i);
        float gw = 0.f;
        for (int64_t j = 0; j < kLanes; ++j) gw += part[j];
        gw_ptr[m] = gw;
      }
    });
  });
  return {grad_h, grad_w, y};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdarch_C, CPU, m) {
  m.impl("swiglu_forward", &swiglu_forward_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace kdarch_C
