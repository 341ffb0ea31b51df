// The schemas of the kdarch_C ops, in one place. Implementations register per device in the op-family files
// (moe_ops.cpp, fp8_ops.cpp; cuda/*.cu through cuda/cuda_ops.cpp); fake (meta) kernels are registered in
// Python (kdarch.ops.cpp.ops), so torch.compile traces these ops and torch.library.opcheck passes.
//
// Legend: T tokens, K slots per token, E experts, H row width, M = T*K routed rows, P rows of the sorted
// layout (M, or more with block padding), I expert width, R x C a quantised matrix, G rows per scale group
// (1 or 128).
#include <torch/library.h>

TORCH_LIBRARY(kdarch_C, m) {
  // Stable counting sort of the M (token, slot) pairs by expert: counts [E], offsets [E+1] (segment starts,
  // each segment rounded up to a multiple of pad_to), sorted_idx [P] (-1 in pad slots), inv_idx [M]; int64.
  m.def("moe_routing(Tensor topk_ids, int n_experts, int pad_to=1) -> (Tensor, Tensor, Tensor, Tensor)");
  // out [P, H]: out[j] = weights[idx[j]] * src[idx[j] // fan] (no weight when None), zeros where idx[j] < 0.
  m.def("moe_permute(Tensor src, Tensor idx, int fan, Tensor? weights=None) -> Tensor");
  // out [T, H] = sum_k weights[t, k] * src[inv_idx[t*K + k]], summed in fp32 in k order (deterministic).
  m.def("moe_unpermute(Tensor src, Tensor inv_idx, int K, Tensor? weights=None, ScalarType? out_dtype=None) -> Tensor");
  // d weights [T, K] fp32 of moe_unpermute: <grad_out[t], src[inv_idx[t*K + k]]>.
  m.def("moe_unpermute_weights_grad(Tensor grad_out, Tensor src, Tensor inv_idx, int K) -> Tensor");
  // The routed experts' weighted SwiGLU on h [M, 2I] = [gate | up]: y [M, I] = w * silu(gate) * up in fp32,
  // stored in h's dtype; w [M] fp32 routing weights.
  m.def("swiglu_forward(Tensor h, Tensor w) -> Tensor");
  // Its backward from grad_y [M, I] fp32: (grad_h [M, 2I] in h's dtype, grad_w [M] fp32, y recomputed).
  m.def("swiglu_backward(Tensor grad_y, Tensor h, Tensor w) -> (Tensor, Tensor, Tensor)");
  // x [(E,) R, C] -> (q e4m3fn, same shape; s fp32 [(E,) ceil(R/G), ceil(C/128)]), as kdarch.kernels.fp8_ref.
  m.def("fp8_quantize(Tensor x, int group_rows, float amax_floor, bool pow2_scale) -> (Tensor, Tensor)");
  // q [R, C] e4m3fn * its tile scales s [ceil(R/G), ceil(C/128)], in out_dtype.
  m.def("fp8_dequantize(Tensor q, Tensor s, int group_rows, ScalarType out_dtype) -> Tensor");
}
