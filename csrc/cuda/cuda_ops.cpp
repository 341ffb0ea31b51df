// CUDA implementations of the kdarch_C ops: argument checks, allocation and the current stream, then the
// launchers of moe_kernels.cu / fp8_kernels.cu (kernels.cuh). Compiled only where torch has CUDA and a
// toolkit is installed (kdarch.ops.cpp.build); the schemas are in ../registration.cpp.
//
// Legend: T tokens, K slots per token, E experts, H row width, M = T*K routed rows, P sorted rows (>= M),
// R x C a quantised matrix, G rows per scale group.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kdarch_C.h"
#include "kernels.cuh"

namespace kdarch_C {
namespace {

cuda::DType dtype_code(const char* op, const char* arg, at::ScalarType t) {
  if (t == at::kFloat) return cuda::kF32;
  if (t == at::kBFloat16) return cuda::kBF16;
  KD_CHECK(t == at::kHalf, op, arg, "a float32, bfloat16 or float16 tensor", t);
  return cuda::kF16;
}

void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  KD_CHECK(t.is_cuda(), op, arg, "a CUDA tensor", t.device());
}

void check_index(const char* op, const char* arg, const at::Tensor& t) {
  check_cuda(op, arg, t);
  KD_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, op, arg, "a 1-D int64 tensor",
           c10::str(t.scalar_type(), " tensor of shape ", t.sizes()));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_routing_cuda(const at::Tensor& topk_ids,
                                                                             int64_t n_experts, int64_t pad_to) {
  check_cuda("moe_routing", "topk_ids", topk_ids);
  KD_CHECK(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, "moe_routing", "topk_ids",
           "an int64/int32 tensor", topk_ids.scalar_type());
  KD_CHECK(n_experts >= 1, "moe_routing", "n_experts", "an int >= 1", n_experts);
  KD_CHECK(pad_to >= 1, "moe_routing", "pad_to", "an int >= 1", pad_to);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t M = ids.numel(), E = n_experts, P = pad_to == 1 ? M : M + E * (pad_to - 1);
  const auto i64 = ids.options().dtype(at::kLong);
  at::Tensor counts = at::empty({E}, i64), offsets = at::empty({E + 1}, i64), inv = at::empty({M}, i64);
  at::Tensor sorted = pad_to == 1 ? at::empty({P}, i64) : at::full({P}, -1, i64);
  at::Tensor hist = at::empty({cuda::routing_blocks(M) * E}, i64);
  cuda::routing(ids.data_ptr(), ids.scalar_type() == at::kLong, M, E, pad_to, counts.data_ptr<int64_t>(),
                offsets.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(), inv.data_ptr<int64_t>(),
                hist.data_ptr<int64_t>(), stream_of(ids));
  return {counts, offsets, sorted, inv};
}

at::Tensor float_weights(const char* op, const std::optional<at::Tensor>& weights, int64_t n) {
  if (!weights.has_value()) return at::Tensor();
  check_cuda(op, "weights", *weights);
  KD_CHECK(weights->numel() == n && weights->is_floating_point(), op, "weights",
           c10::str("a float tensor of ", n, " elements"), weights->sizes());
  return weights->contiguous().to(at::kFloat);
}

at::Tensor moe_permute_cuda(const at::Tensor& src, const at::Tensor& idx, int64_t fan,
                            const std::optional<at::Tensor>& weights) {
  check_cuda("moe_permute", "src", src);
  check_index("moe_permute", "idx", idx);
  KD_CHECK(src.dim() == 2, "moe_permute", "src", "a 2-D tensor [R, H]", src.sizes());
  KD_CHECK(fan >= 1, "moe_permute", "fan", "an int >= 1", fan);
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor x = src.contiguous(), ix = idx.contiguous();
  const at::Tensor w = float_weights("moe_permute", weights, x.size(0) * fan);
  at::Tensor out = at::empty({ix.numel(), x.size(1)}, x.options());
  cuda::permute(x.data_ptr(), dtype_code("moe_permute", "src", x.scalar_type()), ix.data_ptr<int64_t>(),
                w.defined() ? w.data_ptr<float>() : nullptr, ix.numel(), x.size(1), fan, out.data_ptr(),
                stream_of(x));
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& src, const at::Tensor& inv_idx, int64_t K,
                              const std::optional<at::Tensor>& weights, std::optional<at::ScalarType> out_dtype) {
  check_cuda("moe_unpermute", "src", src);
  check_index("moe_unpermute", "inv_idx", inv_idx);
  KD_CHECK(src.dim() == 2, "moe_unpermute", "src", "a 2-D tensor [P, H]", src.sizes());
  KD_CHECK(K >= 1 && inv_idx.numel() % K == 0, "moe_unpermute", "K",
           c10::str("an int >= 1 dividing inv_idx's length ", inv_idx.numel()), K);
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor y = src.contiguous(), inv = inv_idx.contiguous();
  const int64_t T = inv.numel() / K, H = y.size(1);
  const at::Tensor w = float_weights("moe_unpermute", weights, T * K);
  const at::ScalarType odt = out_dtype.value_or(y.scalar_type());
  at::Tensor out = at::empty({T, H}, y.options().dtype(odt));
  cuda::unpermute(y.data_ptr(), dtype_code("moe_unpermute", "src", y.scalar_type()), inv.data_ptr<int64_t>(),
                  w.defined() ? w.data_ptr<float>() : nullptr, T, K, H, out.data_ptr(),
                  dtype_code("moe_unpermute", "out_dtype", odt), stream_of(y));
  return out;
}

at::Tensor moe_unpermute_weights_grad_cuda(const at::Tensor& grad_out, const at::Tensor& src,
                                           const at::Tensor& inv_idx, int64_t K) {
  const char* op = "moe_unpermute_weights_grad";
  check_cuda(op, "grad_out", grad_out);
  check_cuda(op, "src", src);
  check_index(op, "inv_idx", inv_idx);
  KD_CHECK(K >= 1 && inv_idx.numel() % K == 0, op, "K",
           c10::str("an int >= 1 dividing inv_idx's length ", inv_idx.numel()), K);
  KD_CHECK(src.dim() == 2, op, "src", "a 2-D tensor [P, H]", src.sizes());
  const int64_t T = inv_idx.numel() / K, H = src.size(1);
  KD_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H, op, "grad_out",
           c10::str("a tensor [T=", T, ", H=", H, "]"), grad_out.sizes());
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor g = grad_out.contiguous().to(at::kFloat), y = src.contiguous(), inv = inv_idx.contiguous();
  at::Tensor out = at::empty({T, K}, g.options());
  cuda::unpermute_weights_grad(g.data_ptr<float>(), y.data_ptr(), dtype_code(op, "src", y.scalar_type()),
                               inv.data_ptr<int64_t>(), T, K, H, out.data_ptr<float>(), stream_of(y));
  return out;
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_cuda(const at::Tensor& x, int64_t group_rows, double amax_floor,
                                                     bool pow2_scale) {
  check_cuda("fp8_quantize", "x", x);
  KD_CHECK((x.dim() == 2 || x.dim() == 3) && x.is_floating_point() && x.element_size() > 1, "fp8_quantize", "x",
           "a 2-D [R, C] or 3-D [E, R, C] fp32/bf16/fp16 tensor",
           c10::str(x.scalar_type(), " tensor of shape ", x.sizes()));
  KD_CHECK(group_rows >= 1, "fp8_quantize", "group_rows", "an int >= 1", group_rows);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t E = x.dim() == 3 ? x.size(0) : 1, R = x.size(-2), C = x.size(-1);
  const int64_t RT = cdiv(R, group_rows), CT = cdiv(C, kBlock);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor s = x.dim() == 3 ? at::empty({E, RT, CT}, x.options().dtype(at::kFloat))
                              : at::empty({RT, CT}, x.options().dtype(at::kFloat));
  cuda::fp8_quantize(xc.data_ptr(), dtype_code("fp8_quantize", "x", xc.scalar_type()), E, R, C, group_rows,
                     static_cast<float>(amax_floor), pow2_scale, reinterpret_cast<uint8_t*>(q.data_ptr()),
                     s.data_ptr<float>(), stream_of(xc));
  return {q, s};
}

at::Tensor fp8_dequantize_cuda(const at::Tensor& q, const at::Tensor& s, int64_t group_rows,
                               at::ScalarType out_dtype) {
  check_cuda("fp8_dequantize", "q", q);
  check_cuda("fp8_dequantize", "s", s);
  KD_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat8_e4m3fn, "fp8_dequantize", "q",
           "a 2-D float8_e4m3fn tensor", c10::str(q.scalar_type(), " tensor of shape ", q.sizes()));
  KD_CHECK(group_rows >= 1, "fp8_dequantize", "group_rows", "an int >= 1", group_rows);
  const int64_t R = q.size(0), C = q.size(1), RT = cdiv(R, group_rows), CT = cdiv(C, kBlock);
  KD_CHECK(s.dim() == 2 && s.size(0) == RT && s.size(1) == CT && s.scalar_type() == at::kFloat, "fp8_dequantize",
           "s", c10::str("a float32 tensor [", RT, ", ", CT, "]"),
           c10::str(s.scalar_type(), " tensor of shape ", s.sizes()));
  const c10::cuda::CUDAGuard guard(q.device());
  const bool transposed = !q.is_contiguous() && q.stride(0) == 1 && q.stride(1) == R;  // as on the CPU
  const at::Tensor qc = transposed ? q : q.contiguous(), sc = s.contiguous();
  at::Tensor out = transposed ? at::empty_strided({R, C}, {1, R}, q.options().dtype(out_dtype))
                              : at::empty({R, C}, q.options().dtype(out_dtype));
  cuda::fp8_dequantize(reinterpret_cast<const uint8_t*>(qc.data_ptr()), qc.stride(0), qc.stride(1),
                       sc.data_ptr<float>(), R, C, group_rows, out.data_ptr(),
                       dtype_code("fp8_dequantize", "out_dtype", out_dtype), out.stride(0), out.stride(1),
                       stream_of(qc));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdarch_C, CUDA, m) {
  m.impl("moe_routing", &moe_routing_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute_weights_grad", &moe_unpermute_weights_grad_cuda);
  m.impl("fp8_quantize", &fp8_quantize_cuda);
  m.impl("fp8_dequantize", &fp8_dequantize_cuda);
}

}  // namespace kdarch_C
