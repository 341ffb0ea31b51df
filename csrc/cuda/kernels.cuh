// Host launchers of the kdarch_C CUDA kernels (moe_kernels.cu, fp8_kernels.cu), called by cuda_ops.cpp.
//
// Why a plain-C++ boundary: the .cu files include only the CUDA toolkit's headers, so nvcc compiles them in
// seconds and a test can compile them for sm_90 on a machine without a GPU or a CUDA build of torch;
// tensors, checks and the current stream live on the torch side (cuda_ops.cpp). Pointers are device
// pointers, sizes are element counts, `dtype` is a DType code, every launcher runs on `stream`.
//
// Legend: T tokens, K slots per token, E experts, H row width, M = T*K routed rows, P sorted rows (>= M),
// R x C a quantised matrix, G rows per scale group, RT / CT tile counts.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kdarch_C {
namespace cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Stable counting sort of ids [M] (int64 when ids_are_i64, else int32) by expert. sorted_P must hold -1 in
// its pad slots beforehand; hist is scratch of n_blocks(M) * E int64. Ids outside [0, E) are skipped (the
// functional API checks values where kdarch.checks allows a host sync).
int64_t routing_blocks(int64_t M);
void routing(const void* ids, bool ids_are_i64, int64_t M, int64_t E, int64_t pad_to, int64_t* counts_E,
             int64_t* offsets_E1, int64_t* sorted_P, int64_t* inv_M, int64_t* hist, cudaStream_t stream);

// out [P, H] = weights[idx[j]] * src[idx[j] / fan] (weights may be null; zeros where idx[j] < 0).
void permute(const void* src, DType dtype, const int64_t* idx_P, const float* weights, int64_t P, int64_t H,
             int64_t fan, void* out, cudaStream_t stream);

// out [T, H] (dtype out_dtype) = sum_k weights[t, k] * src[inv[t*K + k]], fp32, k in order (weights may be null).
void unpermute(const void* src, DType dtype, const int64_t* inv_M, const float* weights, int64_t T, int64_t K,
               int64_t H, void* out, DType out_dtype, cudaStream_t stream);

// out [T, K] fp32 = <grad_out[t], src[inv[t*K + k]]>, a fixed-order block reduction (deterministic).
void unpermute_weights_grad(const float* grad_out, const void* src, DType dtype, const int64_t* inv_M, int64_t T,
                            int64_t K, int64_t H, float* out, cudaStream_t stream);

// x [E, R, C] row-major -> q bytes [E, R, C], s [E, RT, CT]; as kdarch.kernels.fp8_ref.quantize_ref.
void fp8_quantize(const void* x, DType dtype, int64_t E, int64_t R, int64_t C, int64_t G, float amax_floor,
                  bool pow2_scale, uint8_t* q, float* s, cudaStream_t stream);

// out[r, c] = e4m3(q[r, c]) * s[r / G, c / 128]; q and out are addressed by their (row, col) element strides.
void fp8_dequantize(const uint8_t* q, int64_t q_s0, int64_t q_s1, const float* s, int64_t R, int64_t C, int64_t G,
                    void* out, DType out_dtype, int64_t o_s0, int64_t o_s1, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdarch_C
