// CPU kernels of the MoE dispatch ops: routing metadata, permute (gather into expert order) and un-permute
// (the weighted combine back to token order) with the combine's weight gradient.
//
// Why compiled: the torch backend builds the routing with argsort + searchsorted + a scatter (several passes
// and an O(M log M) sort) and the combine with an index_select, a float copy and a sum; here each is one pass
// over the rows. Routing is a stable counting sort: per-chunk histograms, one scan, per-chunk scatters, so the
// result is the same for any thread count. The combine keeps one fp32 accumulator per output row and adds the
// K slots in order, so it is deterministic too (no atomics; every output row is written by one thread).
//
// Legend: T tokens, K slots per token, E experts, H row width, M = T*K routed rows, P sorted rows (>= M).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "kdarch_C.h"

namespace kdarch_C {
namespace {

template <typename T>
inline float to_f32(T v) { return static_cast<float>(v); }

template <typename id_t>
void routing_cpu(const id_t* ids_M, int64_t M, int64_t E, int64_t pad_to, int64_t* counts_E,
                 int64_t* offsets_E1, int64_t* sorted_P, int64_t* inv_M) {
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), cdiv(M, 1 << 14)));
  const int64_t chunk = cdiv(M, n_chunks);
  std::vector<int64_t> base(n_chunks * E, 0);  // histogram, then each chunk's first sorted slot per expert
  std::vector<int64_t> bad(n_chunks, -1);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = base.data() + c * E;
      for (int64_t m = c * chunk, end = std::min(M, (c + 1) * chunk); m < end; ++m) {
        const int64_t e = static_cast<int64_t>(ids_M[m]);
        if (e < 0 || e >= E) {
          if (bad[c] < 0) bad[c] = m;
          continue;
        }
        ++h[e];
      }
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c) {
    KD_CHECK(bad[c] < 0, "moe_routing", "topk_ids", c10::str("expert ids in [0, ", E, ")"),
             c10::str(static_cast<int64_t>(ids_M[bad[c]]), " at flat index ", bad[c]));
  }
  int64_t start = 0;
  offsets_E1[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t h = base[c * E + e];
      base[c * E + e] = start + n;
      n += h;
    }
    counts_E[e] = n;
    start += cdiv(n, pad_to) * pad_to;
    offsets_E1[e + 1] = start;
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = base.data() + c * E;
      for (int64_t m = c * chunk, end = std::min(M, (c + 1) * chunk); m < end; ++m) {
        const int64_t pos = next[static_cast<int64_t>(ids_M[m])]++;
        sorted_P[pos] = m;
        inv_M[m] = pos;
      }
    }
  });
}

void check_cpu(const char* op, const char* arg, const at::Tensor& t) {
  KD_CHECK(t.device().is_cpu(), op, arg, "a CPU tensor", t.device());
}

void check_index(const char* op, const char* arg, const at::Tensor& t) {
  check_cpu(op, arg, t);
  KD_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, op, arg, "a 1-D int64 tensor",
           c10::str(t.scalar_type(), " tensor of shape ", t.sizes()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_routing_cpu(const at::Tensor& topk_ids,
                                                                            int64_t n_experts, int64_t pad_to) {
  check_cpu("moe_routing", "topk_ids", topk_ids);
  KD_CHECK(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, "moe_routing", "topk_ids",
           "an int64/int32 tensor", topk_ids.scalar_type());
  KD_CHECK(n_experts >= 1, "moe_routing", "n_experts", "an int >= 1", n_experts);
  KD_CHECK(pad_to >= 1, "moe_routing", "pad_to", "an int >= 1", pad_to);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t M = ids.numel(), E = n_experts;
  const auto i64 = ids.options().dtype(at::kLong);
  at::Tensor counts = at::empty({E}, i64), offsets = at::empty({E + 1}, i64), inv = at::empty({M}, i64);
  const int64_t P = pad_to == 1 ? M : M + E * (pad_to - 1);
  at::Tensor sorted = pad_to == 1 ? at::empty({P}, i64) : at::full({P}, -1, i64);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_routing", [&] {
    routing_cpu(ids.data_ptr<index_t>(), M, E, pad_to, counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                sorted.data_ptr<int64_t>(), inv.data_ptr<int64_t>());
  });
  return {counts, offsets, sorted, inv};
}

// Rows per parallel task: about 64 KiB of fp32 work each, so small H still gets few, large tasks.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(H, 1)); }

at::Tensor moe_permute_cpu(const at::Tensor& src, const at::Tensor& idx, int64_t fan,
                           const std::optional<at::Tensor>& weights) {
  check_cpu("moe_permute", "src", src);
  check_index("moe_permute", "idx", idx);
  KD_CHECK(src.dim() == 2, "moe_permute", "src", "a 2-D tensor [R, H]", src.sizes());
  KD_CHECK(fan >= 1, "moe_permute", "fan", "an int >= 1", fan);
  const at::Tensor x = src.contiguous(), ix = idx.contiguous();
  const int64_t R = x.size(0), H = x.size(1), P = ix.numel(), slots = R * fan;
  at::Tensor w;
  if (weights.has_value()) {
    check_cpu("moe_permute", "weights", *weights);
    KD_CHECK(weights->numel() == slots && weights->is_floating_point(), "moe_permute", "weights",
             c10::str("a float tensor of ", slots, " elements (one per slot)"), weights->sizes());
    w = weights->contiguous().to(at::kFloat);
  }
  at::Tensor out = at::empty({P, H}, x.options());
  const int64_t* ix_P = ix.data_ptr<int64_t>();
  const float* w_M = w.defined() ? w.data_ptr<float>() : nullptr;
  std::atomic<int64_t> bad{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_permute", [&] {
    const scalar_t* x_RH = x.data_ptr<scalar_t>();
    scalar_t* out_PH = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, row_grain(H), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t m = ix_P[j];
        scalar_t* dst = out_PH + j * H;
        if (m < 0 || m >= slots) {
          std::fill(dst, dst + H, scalar_t(0));
          if (m >= slots) bad.store(m, std::memory_order_relaxed);  // any one bad index fails the op
          continue;
        }
        const scalar_t* row = x_RH + (m / fan) * H;
        if (w_M == nullptr) {
          std::copy(row, row + H, dst);
        } else {
          const float wm = w_M[m];
          for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(to_f32(row[h]) * wm);
        }
      }
    });
  });
  KD_CHECK(bad.load() < 0, "moe_permute", "idx", 
           c10::str("slot indices < ", slots, " (or -1 for a pad row)"), bad.load());
  return out;
}

at::Tensor moe_unpermute_cpu(const at::Tensor& src, const at::Tensor& inv_idx, int64_t K,
                             const std::optional<at::Tensor>& weights, std::optional<at::ScalarType> out_dtype) {
  check_cpu("moe_unpermute", "src", src);
  check_index("moe_unpermute", "inv_idx", inv_idx);
  KD_CHECK(src.dim() == 2, "moe_unpermute", "src", "a 2-D tensor [P, H]", src.sizes());
  KD_CHECK(K >= 1 && inv_idx.numel() % K == 0, "moe_unpermute", "K",
           c10::str("an int >= 1 dividing inv_idx's length ", inv_idx.numel()), K);
  const at::Tensor y = src.contiguous(), inv = inv_idx.contiguous();
  const int64_t P = y.size(0), H = y.size(1), T = inv.numel() / K;
  at::Tensor w;
  if (weights.has_value()) {
    check_cpu("moe_unpermute", "weights", *weights);
    KD_CHECK(weights->numel() == T * K && weights->is_floating_point(), "moe_unpermute", "weights",
             c10::str("a float tensor [T=", T, ", K=", K, "]"), weights->sizes());
    w = weights->contiguous().to(at::kFloat);
  }
  at::Tensor out = at::empty({T, H}, y.options().dtype(out_dtype.value_or(y.scalar_type())));
  const int64_t* inv_M = inv.data_ptr<int64_t>();
  const float* w_M = w.defined() ? w.data_ptr<float>() : nullptr;
  std::atomic<int64_t> bad{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_unpermute", [&] {
    using src_t = scalar_t;
    const src_t* y_PH = y.data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "moe_unpermute_out", [&] {
      scalar_t* out_TH = out.data_ptr<scalar_t>();
      at::parallel_for(0, T, row_grain(H * K), [&](int64_t t0, int64_t t1) {
        std::vector<float> acc(H);
        for (int64_t t = t0; t < t1; ++t) {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t k = 0; k < K; ++k) {
            const int64_t r = inv_M[t * K + k];
            if (r < 0 || r >= P) {
              bad.store(r, std::memory_order_relaxed);
              continue;
            }
            const src_t* row = y_PH + r * H;
            if (w_M == nullptr) {
              for (int64_t h = 0; h < H; ++h) acc[h] += to_f32(row[h]);
            } else {
              const float wk = w_M[t * K + k];
              for (int64_t h = 0; h < H; ++h) acc[h] += wk * to_f32(row[h]);
            }
          }
          scalar_t* dst = out_TH + t * H;
          for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
        }
      });
    });
  });
  KD_CHECK(bad.load() < 0, "moe_unpermute", "inv_idx", c10::str("row indices in [0, ", P, ")"), bad.load());
  return out;
}

at::Tensor moe_unpermute_weights_grad_cpu(const at::Tensor& grad_out, const at::Tensor& src,
                                          const at::Tensor& inv_idx, int64_t K) {
  const char* op = "moe_unpermute_weights_grad";
  check_cpu(op, "grad_out", grad_out);
  check_cpu(op, "src", src);
  check_index(op, "inv_idx", inv_idx);
  KD_CHECK(K >= 1 && inv_idx.numel() % K == 0, op, "K",
           c10::str("an int >= 1 dividing inv_idx's length ", inv_idx.numel()), K);
  const int64_t T = inv_idx.numel() / K;
  KD_CHECK(src.dim() == 2, op, "src", "a 2-D tensor [P, H]", src.sizes());
  const int64_t P = src.size(0), H = src.size(1);
  KD_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H, op, "grad_out",
           c10::str("a tensor [T=", T, ", H=", H, "]"), grad_out.sizes());
  const at::Tensor g = grad_out.contiguous().to(at::kFloat), inv = inv_idx.contiguous();
  const at::Tensor y = src.contiguous();
  at::Tensor out = at::empty({T, K}, g.options());
  const int64_t* inv_M = inv.data_ptr<int64_t>();
  const float* g_TH = g.data_ptr<float>();
  float* out_M = out.data_ptr<float>();
  std::atomic<int64_t> bad{-1};
  constexpr int kLanes = 8;  // fixed partial sums, combined in a fixed order: vectorises, and is deterministic
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_unpermute_weights_grad", [&] {
    const scalar_t* y_PH = y.data_ptr<scalar_t>();
    at::parallel_for(0, T * K, row_grain(H), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t r = inv_M[m];
        if (r < 0 || r >= P) {
          bad.store(r, std::memory_order_relaxed);
          out_M[m] = 0.f;
          continue;
        }
        const float* gr = g_TH + (m / K) * H;
        const scalar_t* yr = y_PH + r * H;
        float lane[kLanes] = {0.f};
        int64_t h = 0;
        for (; h + kLanes <= H; h += kLanes) {
          for (int l = 0; l < kLanes; ++l) lane[l] += gr[h + l] * to_f32(yr[h + l]);
        }
        for (; h < H; ++h) lane[0] += gr[h] * to_f32(yr[h]);
        float s = 0.f;
        for (int l = 0; l < kLanes; ++l) s += lane[l];
        out_M[m] = s;
      }
    });
  });
  KD_CHECK(bad.load() < 0, op, "inv_idx", c10::str("row indices in [0, ", P, ")"), bad.load());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdarch_C, CPU, m) {
  m.impl("moe_routing", &moe_routing_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_weights_grad", &moe_unpermute_weights_grad_cpu);
}

}  // namespace kdarch_C
