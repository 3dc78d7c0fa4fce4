// CPU backend, part 3: the MoE gate (scores, group-limited top-K, weights) with its backward,
// the row gather/scatter that dispatch tokens to experts and combine their outputs, and the
// few-token experts (moe_experts_small, the shared experts optionally folded in) as plain dot
// products.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_util.h"

namespace moekit {

namespace {

// The routed_scaling_factor multiplies the weights unless V2-style (softmax) normalisation is on
// (architecture.md: "if norm_topk_prob then g /= sum(g), else g *= routed_scaling_factor"); V3's
// sigmoid gate normalises and then scales.
float weight_scale(const GateParams& p) {
  bool normalised = p.norm_topk_prob && p.top_k > 1;
  return (!normalised || p.scoring == ScoringFunc::Sigmoid) ? p.routed_scaling_factor : 1.0f;
}
bool normalises(const GateParams& p) {
  return p.norm_topk_prob && p.top_k > 1;
}

// Indices of the `k` largest values of v (ties -> lower index), in descending order.
void top_k(const float* v, int64_t n, int64_t k, std::vector<int32_t>& order, int32_t* out) {
  order.resize(size_t(n));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  std::copy(order.begin(), order.begin() + k, out);
}

}  // namespace

void CpuBackend::moe_gate_forward(Tensor& topk_idx, Tensor& topk_w, Tensor& scores,
                                  const Tensor& logits, const Tensor& bias, const GateParams& p) {
  const int64_t T = rows(logits), E = p.n_experts, K = p.top_k;
  MOEKIT_CHECK(cols(logits) == E && E % p.n_group == 0 && K <= E, "gate shapes");
  const int64_t G = p.n_group, per_group = E / G;
  const bool grouped = p.method != TopkMethod::Greedy && G > 1;
  const float wscale = weight_scale(p);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> choice(static_cast<size_t>(E)), gscore(static_cast<size_t>(G));
    std::vector<int32_t> order, groups(static_cast<size_t>(G));
    for (int64_t t = b; t < e; ++t) {
      const float* l = logits.f32() + t * E;
      float* s = scores.f32() + t * E;
      if (p.scoring == ScoringFunc::Softmax) {
        float m = *std::max_element(l, l + E), z = 0.0f;
        for (int64_t i = 0; i < E; ++i) z += (s[i] = std::exp(l[i] - m));
        for (int64_t i = 0; i < E; ++i) s[i] /= z;
      } else {
        for (int64_t i = 0; i < E; ++i) s[i] = 1.0f / (1.0f + std::exp(-l[i]));
      }
      // Selection score: s plus the balancing bias (which never reaches the weights).
      for (int64_t i = 0; i < E; ++i)
        choice[size_t(i)] = s[i] + (bias.defined() ? bias.f32()[i] : 0.0f);
      if (grouped) {
        for (int64_t g = 0; g < G; ++g) {
          const float* c = choice.data() + g * per_group;
          if (p.method == TopkMethod::GroupLimitedGreedy) {
            gscore[size_t(g)] = *std::max_element(c, c + per_group);
          } else {  // noaux_tc: sum of the two best in the group
            float a = -std::numeric_limits<float>::infinity(), bb = a;
            for (int64_t i = 0; i < per_group; ++i) {
              if (c[i] > a) {
                bb = a;
                a = c[i];
              } else if (c[i] > bb) {
                bb = c[i];
              }
            }
            gscore[size_t(g)] = per_group > 1 ? a + bb : a;
          }
        }
        top_k(gscore.data(), G, p.topk_group, order, groups.data());
        std::vector<bool> keep(size_t(G), false);
        for (int64_t g = 0; g < p.topk_group; ++g) keep[size_t(groups[size_t(g)])] = true;
        for (int64_t i = 0; i < E; ++i)
          if (!keep[size_t(i / per_group)])
            choice[size_t(i)] = -std::numeric_limits<float>::infinity();
      }
      int32_t* idx = topk_idx.i32() + t * K;
      top_k(choice.data(), E, K, order, idx);
      float* w = topk_w.f32() + t * K;
      float denom = 0.0f;
      for (int64_t k = 0; k < K; ++k) denom += (w[k] = s[idx[k]]);
      denom += 1e-20f;
      for (int64_t k = 0; k < K; ++k) w[k] = (normalises(p) ? w[k] / denom : w[k]) * wscale;
    }
  });
}

void CpuBackend::moe_gate_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& topk_idx,
                                   const Tensor& scores, const Tensor& dscores,
                                   const GateParams& p) {
  const int64_t T = rows(scores), E = p.n_experts, K = p.top_k;
  const float wscale = weight_scale(p);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> ds(static_cast<size_t>(E));
    for (int64_t t = b; t < e; ++t) {
      const float* s = scores.f32() + t * E;
      const int32_t* idx = topk_idx.i32() + t * K;
      const float* dw = dtopk_w.f32() + t * K;
      if (dscores.defined())
        std::copy(dscores.f32() + t * E, dscores.f32() + (t + 1) * E, ds.begin());
      else
        std::fill(ds.begin(), ds.end(), 0.0f);
      if (normalises(p)) {
        // w_k = c z_k / D, D = sum z: dz_k = c (dw_k - sum_j dw_j z_j / D) / D.
        float denom = 1e-20f, wz = 0.0f;
        for (int64_t k = 0; k < K; ++k) denom += s[idx[k]];
        for (int64_t k = 0; k < K; ++k) wz += dw[k] * s[idx[k]];
        for (int64_t k = 0; k < K; ++k) ds[size_t(idx[k])] += wscale * (dw[k] - wz / denom) / denom;
      } else {
        for (int64_t k = 0; k < K; ++k) ds[size_t(idx[k])] += wscale * dw[k];
      }
      float* dl = dlogits.f32() + t * E;
      if (p.scoring == ScoringFunc::Softmax) {
        float sum = 0.0f;
        for (int64_t i = 0; i < E; ++i) sum += ds[size_t(i)] * s[i];
        for (int64_t i = 0; i < E; ++i) dl[i] = s[i] * (ds[size_t(i)] - sum);
      } else {
        for (int64_t i = 0; i < E; ++i) dl[i] = ds[size_t(i)] * s[i] * (1.0f - s[i]);
      }
    }
  });
}

void CpuBackend::moe_dispatch_plan(Tensor& slot_token, Tensor& slot_pair, Tensor& slot_weight,
                                   Tensor& token_slots, Tensor& expert_begin, Tensor& expert_rows,
                                   const Tensor& topk_idx, const Tensor& topk_w, int64_t n_experts,
                                   int64_t align) {
  const int64_t N = topk_idx.numel(), K = cols(topk_idx);
  MOEKIT_CHECK(align >= 1, "moe_dispatch_plan: align {} (must be >= 1)", align);
  const int64_t S = dispatch_slots(N, n_experts, align);
  MOEKIT_CHECK(topk_idx.dtype() == DType::I32 && topk_w.numel() == N && slot_token.numel() == S &&
                   slot_pair.numel() == S && slot_weight.numel() == S &&
                   token_slots.dtype() == DType::I32 && token_slots.numel() == N &&
                   expert_begin.numel() == n_experts + 1 && expert_rows.numel() == n_experts,
               "moe_dispatch_plan: topk_idx {} topk_w {} slots {} {} {} token_slots {} "
               "expert_begin {} expert_rows {} for {} experts aligned to {}",
               topk_idx.shape().str(), topk_w.shape().str(), slot_token.shape().str(),
               slot_pair.shape().str(), slot_weight.shape().str(), token_slots.shape().str(),
               expert_begin.shape().str(), expert_rows.shape().str(), n_experts, align);
  expect_indices(topk_idx, n_experts, "moe_dispatch_plan", "expert");
  const int32_t* idx = topk_idx.i32();
  int32_t *begin = expert_begin.i32(), *count = expert_rows.i32();
  // Counting sort: count per expert, padded prefix sums, then place pairs in order (stable).
  std::fill(count, count + n_experts, 0);
  for (int64_t i = 0; i < N; ++i) ++count[idx[i]];
  begin[0] = 0;
  for (int64_t e = 0; e < n_experts; ++e)
    begin[e + 1] = begin[e] + int32_t((count[e] + align - 1) / align * align);
  std::fill(slot_token.i32(), slot_token.i32() + S, -1);  // padding until a pair lands
  std::fill(slot_pair.i32(), slot_pair.i32() + S, -1);
  std::fill(slot_weight.f32(), slot_weight.f32() + S, 0.0f);
  std::vector<int32_t> cursor(begin, begin + n_experts);
  for (int64_t i = 0; i < N; ++i) {
    const int32_t s = cursor[size_t(idx[i])]++;
    slot_token.i32()[s] = int32_t(i / K);
    slot_pair.i32()[s] = int32_t(i);
    slot_weight.f32()[s] = topk_w.f32()[i];
    token_slots.i32()[i] = s;
  }
  for (int64_t t = 0; K > 0 && t < N / K; ++t)  // each token's slots, increasing
    std::sort(token_slots.i32() + t * K, token_slots.i32() + (t + 1) * K);
}

void CpuBackend::moe_experts_small(Tensor& y, const Tensor& x, const Tensor& topk_idx,
                                   const Tensor& topk_w, std::span<const ExpertWeights> experts,
                                   bool accumulate, const ExpertWeights* shared) {
  const auto [T, K, H, I, E, Is, dtype] =
      moe_experts_small_dims(y, x, topk_idx, topk_w, experts, shared);
  MOEKIT_CHECK(dtype == DType::F32, "moe_experts_small: {} weights on the CPU", dtype_name(dtype));
  expect_indices(topk_idx, E, "moe_experts_small", "expert");
  auto dot = [](const float* a, const float* b, int64_t n) {
    float s = 0.0f;
    for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
    return s;
  };
  // silu(gate x) * up x for the I rows of one expert into out.
  auto swiglu_rows = [&](const ExpertWeights& w, const float* xt, int64_t inter, float* out) {
    for (int64_t i = 0; i < inter; ++i) {
      const float g = dot(w.gate_proj->f32() + i * H, xt, H);
      const float u = dot(w.up_proj->f32() + i * H, xt, H);
      out[i] = g / (1.0f + std::exp(-g)) * u;
    }
  };
  // h[t*K+k] = silu(gate_e x_t) * up_e x_t (and hs[t], the shared experts' alike), then
  // y[t] (+)= (sum_k w[t,k] down_e h[t*K+k], k in order) + down_s hs[t]: the order ops.h documents.
  std::vector<float> h(static_cast<size_t>(T * K * I)), hs(static_cast<size_t>(T * Is));
  cpu_pool().parallel_for(T * K, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      swiglu_rows(experts[size_t(topk_idx.i32()[p])], x.f32() + (p / K) * H, I, &h[size_t(p * I)]);
  });
  if (shared)
    cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) swiglu_rows(*shared, x.f32() + t * H, Is, hs.data() + t * Is);
    });
  cpu_pool().parallel_for(T * H, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t t = r / H, j = r % H;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const ExpertWeights& w = experts[size_t(topk_idx.i32()[t * K + k])];
        acc += topk_w.f32()[t * K + k] *
               dot(w.down_proj->f32() + j * I, &h[size_t((t * K + k) * I)], I);
      }
      if (shared) acc += dot(shared->down_proj->f32() + j * Is, hs.data() + t * Is, Is);
      y.f32()[r] = accumulate ? y.f32()[r] + acc : acc;
    }
  });
}

void CpuBackend::gather_rows(Tensor& out, const Tensor& x, const Tensor& rows_,
                             const Tensor* weights) {
  // I32 rows are index tensors, moved as they are; F32 and I32 elements are both 4 bytes, and
  // 0.0f and 0 both all-zero bits, so one loop of byte copies serves both.
  if (x.dtype() == DType::I32 || out.dtype() == DType::I32)
    MOEKIT_CHECK(x.dtype() == DType::I32 && out.dtype() == DType::I32 && !weights,
                 "CPU gather_rows: x {}, out {}{} (I32 rows go to an I32 out, unweighted)",
                 dtype_name(x.dtype()), dtype_name(out.dtype()), weights ? ", weighted" : "");
  else
    expect_f32_on_cpu("gather_rows", {&out, &x, weights});
  expect_indices(rows_, rows(x), "gather_rows", "row", /*allow_negative=*/true);
  const int64_t N = rows_.numel(), C = cols(x);
  const size_t row_bytes = size_t(C) * 4;
  cpu_pool().parallel_for(N, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      char* dst = out.data<char>() + size_t(i) * row_bytes;
      const int32_t row = rows_.i32()[i];
      if (row < 0) {  // a padding slot
        std::memset(dst, 0, row_bytes);
      } else if (weights) {
        const float w = weights->f32()[i];
        const float* src = x.f32() + int64_t(row) * C;
        float* d = out.f32() + i * C;
        for (int64_t c = 0; c < C; ++c) d[c] = w * src[c];
      } else {
        std::memcpy(dst, x.data<char>() + size_t(row) * row_bytes, row_bytes);
      }
    }
  });
}

void CpuBackend::scatter_add_rows(Tensor& out, const Tensor& x, const Tensor& rows_,
                                  const Tensor* weights) {
  // Several rows may land on one output row: split columns over threads, walk rows in order.
  expect_f32_on_cpu("scatter_add_rows", {&out, &x, weights});
  expect_indices(rows_, rows(out), "scatter_add_rows", "row", /*allow_negative=*/true);
  const int64_t N = rows_.numel(), C = cols(out);
  cpu_pool().parallel_for(
      C,
      [&](int64_t cb, int64_t ce) {
        for (int64_t i = 0; i < N; ++i) {
          const int32_t row = rows_.i32()[i];
          if (row < 0) continue;  // a padding slot
          float w = weights ? weights->f32()[i] : 1.0f;
          float* dst = out.f32() + int64_t(row) * C;
          const float* src = x.f32() + i * C;
          for (int64_t c = cb; c < ce; ++c) dst[c] += w * src[c];
        }
      },
      64);
}

}  // namespace moekit
