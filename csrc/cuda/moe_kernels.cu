// CUDA kernels of the MoE dispatch ops (the CPU versions are in ../moe_ops.cpp; same results, bit for bit:
// integer routing, and fp32 sums in the same order).
//
// Routing is the CPU's stable counting sort, spread over blocks: each block counts its chunk of rows in
// shared memory (counts commute, so atomics are fine there), one block turns the per-chunk counts into
// first slots, and each block scatters its chunk with one thread per expert walking the chunk in order, so
// rows keep their token order with no sort. The combine gives each output row to one block and adds the K
// slots in order; the weight gradient reduces in a fixed tree. No float atomics anywhere: deterministic.
//
// Legend: T tokens, K slots per token, E experts, H row width, M = T*K routed rows, P sorted rows (>= M).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kdarch_C.h"
#include "kernels.cuh"

namespace kdarch_C {
namespace cuda {
namespace {

constexpr int kChunk = 1024;  // rows per routing block
constexpr int kThreads = 256;

__device__ __forceinline__ float load_f32(const void* p, DType dt, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

__device__ __forceinline__ void store_f32(void* p, DType dt, int64_t i, float v) {
  if (dt == kF32) static_cast<float*>(p)[i] = v;
  else if (dt == kBF16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<__half*>(p)[i] = __float2half_rn(v);
}

__device__ __forceinline__ int64_t load_id(const void* ids, bool i64, int64_t m) {
  return i64 ? static_cast<const int64_t*>(ids)[m] : static_cast<int64_t>(static_cast<const int32_t*>(ids)[m]);
}

__global__ void histogram_kernel(const void* ids, bool i64, int64_t M, int64_t E, int64_t* hist) {
  extern __shared__ int counts_s[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) counts_s[e] = 0;
  __syncthreads();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kChunk, m1 = min(M, m0 + kChunk);
  for (int64_t m = m0 + threadIdx.x; m < m1; m += blockDim.x) {
    const int64_t e = load_id(ids, i64, m);
    if (e >= 0 && e < E) atomicAdd(&counts_s[e], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[blockIdx.x * E + e] = counts_s[e];
}

// One block: counts, padded segment offsets, and hist[b, e] := the first sorted slot of chunk b's e-rows.
__global__ void scan_kernel(int64_t* hist, int64_t NB, int64_t E, int64_t pad_to, int64_t* counts_E,
                            int64_t* offsets_E1) {
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t n = 0;
    for (int64_t b = 0; b < NB; ++b) n += hist[b * E + e];
    counts_E[e] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t start = 0;
    offsets_E1[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
      start += (counts_E[e] + pad_to - 1) / pad_to * pad_to;
      offsets_E1[e + 1] = start;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t next = offsets_E1[e];
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t h = hist[b * E + e];
      hist[b * E + e] = next;
      next += h;
    }
  }
}

__global__ void scatter_kernel(const void* ids, bool i64, int64_t M, int64_t E, const int64_t* hist,
                               int64_t* sorted_P, int64_t* inv_M) {
  __shared__ int32_t ids_s[kChunk];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kChunk, n = min(M - m0, static_cast<int64_t>(kChunk));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ids_s[i] = static_cast<int32_t>(load_id(ids, i64, m0 + i));
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {  // one thread per expert, the chunk in row order
    int64_t pos = hist[blockIdx.x * E + e];
    for (int64_t i = 0; i < n; ++i) {
      if (ids_s[i] == e) {
        sorted_P[pos] = m0 + i;
        inv_M[m0 + i] = pos;
        ++pos;
      }
    }
  }
}

__global__ void permute_kernel(const void* src, DType dt, const int64_t* idx_P, const float* weights, int64_t H,
                               int64_t fan, void* out) {
  const int64_t j = blockIdx.x, m = idx_P[j];
  const float w = (weights != nullptr && m >= 0) ? weights[m] : 1.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float v = m < 0 ? 0.f : load_f32(src, dt, (m / fan) * H + h);
    store_f32(out, dt, j * H + h, weights != nullptr ? v * w : v);
  }
}

__global__ void unpermute_kernel(const void* src, DType dt, const int64_t* inv_M, const float* weights, int64_t K,
                                 int64_t H, void* out, DType out_dt) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = load_f32(src, dt, inv_M[t * K + k] * H + h);
      acc = weights != nullptr ? acc + weights[t * K + k] * v : acc + v;
    }
    store_f32(out, out_dt, t * H + h, acc);
  }
}

__global__ void weights_grad_kernel(const float* grad_out, const void* src, DType dt, const int64_t* inv_M,
                                    int64_t K, int64_t H, float* out) {
  __shared__ float part_s[kThreads];
  const int64_t m = blockIdx.x, r = inv_M[m];
  float acc = 0.f;
  for (int64_t h = threadIdx.x; h < H; h += kThreads) acc += grad_out[(m / K) * H + h] * load_f32(src, dt, r * H + h);
  part_s[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {  // fixed tree: the same order on every run
    if (threadIdx.x < s) part_s[threadIdx.x] += part_s[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[m] = part_s[0];
}

int threads_for(int64_t H) { return H >= kThreads ? kThreads : (H >= 128 ? 128 : 64); }

}  // namespace

int64_t routing_blocks(int64_t M) { return M > 0 ? cdiv(M, kChunk) : 1; }

void routing(const void* ids, bool i64, int64_t M, int64_t E, int64_t pad_to, int64_t* counts_E,
             int64_t* offsets_E1, int64_t* sorted_P, int64_t* inv_M, int64_t* hist, cudaStream_t stream) {
  const int64_t NB = routing_blocks(M);
  if (M > 0) {
    histogram_kernel<<<NB, kThreads, E * sizeof(int), stream>>>(ids, i64, M, E, hist);
  } else {
    cudaMemsetAsync(hist, 0, E * sizeof(int64_t), stream);
  }
  scan_kernel<<<1, kThreads, 0, stream>>>(hist, NB, E, pad_to, counts_E, offsets_E1);
  if (M > 0) scatter_kernel<<<NB, kThreads, 0, stream>>>(ids, i64, M, E, hist, sorted_P, inv_M);
}

void permute(const void* src, DType dtype, const int64_t* idx_P, const float* weights, int64_t P, int64_t H,
             int64_t fan, void* out, cudaStream_t stream) {
  if (P == 0 || H == 0) return;
  permute_kernel<<<P, threads_for(H), 0, stream>>>(src, dtype, idx_P, weights, H, fan, out);
}

void unpermute(const void* src, DType dtype, const int64_t* inv_M, const float* weights, int64_t T, int64_t K,
               int64_t H, void* out, DType out_dtype, cudaStream_t stream) {
  if (T == 0 || H == 0) return;
  unpermute_kernel<<<T, threads_for(H), 0, stream>>>(src, dtype, inv_M, weights, K, H, out, out_dtype);
}

void unpermute_weights_grad(const float* grad_out, const void* src, DType dtype, const int64_t* inv_M, int64_t T,
                            int64_t K, int64_t H, float* out, cudaStream_t stream) {
  if (T * K == 0) return;
  weights_grad_kernel<<<T * K, kThreads, 0, stream>>>(grad_out, src, dtype, inv_M, K, H, out);
}

}  // namespace cuda
}  // namespace kdarch_C
