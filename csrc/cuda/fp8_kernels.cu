// CUDA kernels of FP8 (e4m3fn) quantisation in G x 128 tiles and dequantisation (the CPU versions are in
// ../fp8_ops.cpp). Both use e4m3_from_f32 from kdarch_C.h, the one rounding function of every device, and
// the same fp32 operations in the same order (amax as integer max of |x|'s bits, max with the floor, a true
// division by 448, optional pow2_ceil, a true division x / s), so results are bit-identical to the CPU and to
// the torch backend. Compiled without fast-math (and with --fmad=false): IEEE division and no contraction.
//
// Legend: E experts (leading dim), R x C a matrix, G rows per scale group, RT / CT tile counts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kdarch_C.h"
#include "kernels.cuh"

namespace kdarch_C {
namespace cuda {
namespace {

__device__ __forceinline__ float load_f32(const void* p, DType dt, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

// One block of 128 threads per tile; thread c owns column c0 + c of the tile's G (or fewer) rows.
__global__ void quantize_kernel(const void* x, DType dt, int64_t R, int64_t C, int64_t G, int64_t RT, int64_t CT,
                                float amax_floor, bool pow2, uint8_t* q, float* s) {
  __shared__ unsigned int amax_s;
  __shared__ float scale_s;
  const int64_t tile = blockIdx.x, e = tile / (RT * CT), rt = (tile / CT) % RT, ct = tile % CT;
  const int64_t r0 = rt * G, r1 = min(R, r0 + G), c = ct * kBlock + threadIdx.x;
  const int64_t base = e * R * C;
  if (threadIdx.x == 0) amax_s = 0u;
  __syncthreads();
  unsigned int amax = 0u;
  if (c < C) {
    for (int64_t r = r0; r < r1; ++r) amax = max(amax, f32_bits(load_f32(x, dt, base + r * C + c)) & 0x7FFFFFFFu);
  }
  atomicMax(&amax_s, amax);  // max commutes: the result does not depend on the order
  __syncthreads();
  if (threadIdx.x == 0) {
    float sc;
    if (amax_s >= 0x7F800000u) {
      sc = __int_as_float(0x7FC00000);  // inf / NaN in the tile: poisoned
    } else {
      sc = fmaxf(bits_f32(amax_s), amax_floor) / kE4m3Max;
      if (pow2) sc = pow2_ceil(sc);
    }
    scale_s = sc;
    s[tile] = sc;
  }
  __syncthreads();
  if (c >= C) return;
  const float sc = scale_s;
  const bool bad = amax_s >= 0x7F800000u;
  for (int64_t r = r0; r < r1; ++r) {
    q[base + r * C + c] = bad ? kE4m3Nan : e4m3_from_f32(__fdiv_rn(load_f32(x, dt, base + r * C + c), sc));
  }
}

__global__ void dequantize_kernel(const uint8_t* q, int64_t q_s0, int64_t q_s1, const float* s, int64_t R, int64_t C,
                                  int64_t G, int64_t CT, void* out, DType out_dt, int64_t o_s0, int64_t o_s1) {
  const int64_t n = R * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i % C;
    const float v = e4m3_to_f32(q[r * q_s0 + c * q_s1]) * s[(r / G) * CT + c / kBlock];
    const int64_t o = r * o_s0 + c * o_s1;
    if (out_dt == kF32) static_cast<float*>(out)[o] = v;
    else if (out_dt == kBF16) static_cast<__nv_bfloat16*>(out)[o] = __float2bfloat16_rn(v);
    else static_cast<__half*>(out)[o] = __float2half_rn(v);
  }
}

}  // namespace

void fp8_quantize(const void* x, DType dtype, int64_t E, int64_t R, int64_t C, int64_t G, float amax_floor,
                  bool pow2_scale, uint8_t* q, float* s, cudaStream_t stream) {
  const int64_t RT = cdiv(R, G), CT = cdiv(C, kBlock), tiles = E * RT * CT;
  if (tiles == 0) return;
  quantize_kernel<<<tiles, kBlock, 0, stream>>>(x, dtype, R, C, G, RT, CT, amax_floor, pow2_scale, q, s);
}

void fp8_dequantize(const uint8_t* q, int64_t q_s0, int64_t q_s1, const float* s, int64_t R, int64_t C, int64_t G,
                    void* out, DType out_dtype, int64_t o_s0, int64_t o_s1, cudaStream_t stream) {
  const int64_t n = R * C;
  if (n == 0) return;
  const int64_t blocks = cdiv(n, 256) < 65535 ? cdiv(n, 256) : 65535;
  dequantize_kernel<<<blocks, 256, 0, stream>>>(q, q_s0, q_s1, s, R, C, G, cdiv(C, kBlock), out, out_dtype, o_s0,
                                                o_s1);
}

}  // namespace cuda
}  // namespace kdarch_C
