// CUDA kernels, part 4: MoE permute plan (pairs sorted by expert), token dispatch (gather), combine
// (scatter-add through a sorted plan), the combine-weight gradient (row dot), the few-token
// experts' GEMVs (decode) and the gate (scores, group-limited / noaux_tc top-K with the balancing
// bias, normalisation and scaling) with its backward. Why hand-written: the gate's selection
// rules (DeepSeek-V2/V3 routing, CPU-identical tie breaking) are no library routine, and the
// scatter must be deterministic, which the usual float-atomic scatter is not: we stably sort
// positions by destination (cub radix sort) and let one block per destination add its sources in
// increasing position order.
#include <cub/device/device_radix_sort.cuh>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/index_check.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/warp_dots.cuh"

namespace moekit::cuda {

namespace {

// The gather on fp32 or bf16 output storage (bf16: the weighted value rounded once).
template <typename T>
cudaError_t gather_rows_as(T* out, const float* x, const int32_t* rows, const float* weights,
                           int64_t n, int64_t dim) {
  return for_each(n * dim, [=] __device__(int64_t e) {
    const int64_t i = e / dim, c = e % dim;
    const float v = x[int64_t(rows[i]) * dim + c];
    out[e] = from_f32<T>(weights ? weights[i] * v : v);
  });
}

// One warp per output: a strided partial sum per lane, then a fixed shuffle tree. b fp32 or bf16
// (widened exactly).
template <typename B>
__global__ void row_dot_kernel(float* out, const float* a, const int32_t* rows, const B* b,
                               int64_t n, int64_t dim) {
  const int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (i >= n) return;  // whole warps leave together
  const float* pa = a + int64_t(rows[i]) * dim;
  const B* pb = b + i * dim;
  float s = 0.0f;
  for (int64_t c = lane; c < dim; c += 32) s += pa[c] * to_f32(pb[c]);
  s = warp_reduce(s, Sum{});
  if (lane == 0) out[i] = s;
}

int end_bit_for(int64_t num_rows) {
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) < num_rows) ++bits;
  return bits;
}

// Block p handles sorted position p if it starts a run of one destination row: the run's sources
// are added in order (the sort is stable), column-parallel across the block's threads. x fp32 or
// bf16 (widened exactly).
template <typename X>
__global__ void scatter_add_planned_kernel(float* out, const X* x, const float* weights,
                                           const int32_t* sorted_rows, const int32_t* order,
                                           int64_t n, int64_t dim) {
  const int64_t p = blockIdx.x;
  const int32_t row = sorted_rows[p];
  if (p > 0 && sorted_rows[p - 1] == row) return;
  float* dst = out + int64_t(row) * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float acc = dst[c];
    for (int64_t q = p; q < n && sorted_rows[q] == row; ++q) {
      const int64_t src = order[q];
      acc += (weights ? weights[src] : 1.0f) * to_f32(x[src * dim + c]);
    }
    dst[c] = acc;
  }
}

template <typename B>
cudaError_t row_dot_as(float* out, const float* a, const int32_t* rows, const B* b, int64_t n,
                       int64_t dim) {
  row_dot_kernel<B><<<blocks_for(n * 32), kThreads, 0, stream()>>>(out, a, rows, b, n, dim);
  return cudaGetLastError();
}

template <typename X>
cudaError_t scatter_add_planned_as(float* out, const X* x, const float* weights,
                                   const int32_t* sorted_rows, const int32_t* order, int64_t n,
                                   int64_t dim) {
  const int threads = dim >= 256 ? 256 : (dim >= 128 ? 128 : 64);
  scatter_add_planned_kernel<X>
      <<<unsigned(n), threads, 0, stream()>>>(out, x, weights, sorted_rows, order, n, dim);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_rows(void* out, DType out_dtype, const float* x, const int32_t* rows,
                        const float* weights, int64_t n, int64_t dim) {
  if (out_dtype == DType::BF16)
    return gather_rows_as(static_cast<bf16_t*>(out), x, rows, weights, n, dim);
  return gather_rows_as(static_cast<float*>(out), x, rows, weights, n, dim);
}

cudaError_t row_dot(float* out, const float* a, const int32_t* rows, const void* b, DType b_dtype,
                    int64_t n, int64_t dim) {
  if (n == 0) return cudaSuccess;
  if (b_dtype == DType::BF16)
    return row_dot_as(out, a, rows, static_cast<const bf16_t*>(b), n, dim);
  return row_dot_as(out, a, rows, static_cast<const float*>(b), n, dim);
}

size_t row_plan_temp_bytes(int64_t n, int64_t num_rows) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), n, 0, end_bit_for(num_rows));
  return bytes;
}

cudaError_t row_plan(void* temp, size_t temp_bytes, const int32_t* rows, int32_t* sorted_rows,
                     int32_t* iota, int32_t* order, int64_t n, int64_t num_rows) {
  if (n == 0) return cudaSuccess;
  cudaError_t e = for_each(n, [=] __device__(int64_t i) { iota[i] = int32_t(i); });
  if (e != cudaSuccess) return e;
  // Keys are valid rows (checked by the caller), so the low end_bit bits order them.
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, rows, sorted_rows, iota, order, n, 0,
                                         end_bit_for(num_rows));
}

cudaError_t scatter_add_planned(float* out, const void* x, DType x_dtype, const float* weights,
                                const int32_t* sorted_rows, const int32_t* order, int64_t n,
                                int64_t dim) {
  if (n == 0 || dim == 0) return cudaSuccess;
  if (x_dtype == DType::BF16)
    return scatter_add_planned_as(out, static_cast<const bf16_t*>(x), weights, sorted_rows, order,
                                  n, dim);
  return scatter_add_planned_as(out, static_cast<const float*>(x), weights, sorted_rows, order, n,
                                dim);
}

cudaError_t moe_dispatch_plan(void* temp, size_t temp_bytes, int32_t* sorted_experts, int32_t* iota,
                              int32_t* slot_token, int32_t* slot_pair, float* slot_weight,
                              int32_t* expert_begin, const int32_t* topk_idx, const float* topk_w,
                              int64_t n, int64_t k, int64_t n_experts) {
  // The radix sort is stable, so within an expert the pairs keep their order t*K+k: the same
  // slots as the CPU's counting sort.
  cudaError_t e =
      row_plan(temp, temp_bytes, topk_idx, sorted_experts, iota, slot_pair, n, n_experts);
  if (e != cudaSuccess) return e;
  e = for_each(n, [=] __device__(int64_t s) {
    const int32_t pair = slot_pair[s];
    slot_token[s] = int32_t(pair / k);
    slot_weight[s] = topk_w[pair];
  });
  if (e != cudaSuccess) return e;
  return for_each(n_experts + 1, [=] __device__(int64_t ex) {
    int64_t lo = 0, hi = n;  // first position whose expert is >= ex
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sorted_experts[mid] < ex)
        lo = mid + 1;
      else
        hi = mid;
    }
    expert_begin[ex] = int32_t(lo);
  });
}

// ---------------------------------------------------------------------------------------------
// Few-token experts (decode): GEMVs straight from the routing. At a handful of tokens every
// expert GEMM is a matrix-vector product, bound by reading the weights; cuBLAS would need the
// per-expert row counts on the host (a sync) and a launch per expert and projection. Here one
// warp computes one output row: each lane streams 16-byte chunks of the weight row(s), sums in
// fp32, and a fixed shuffle tree finishes the dot product (deterministic). Weights are read as
// stored (fp32 or bf16); activations stay fp32. The routing's expert ids are range-checked here
// (IndexCheck): the up pass records a bad one, both passes use the replacement.

namespace {

constexpr int kSmallThreads = 256;  // 8 warps per block
constexpr int kSmallDownRows = 8;   // down-projection rows (top-k slots) streamed together

// h[p, i] = silu(gate_e[i] . x_t) * (up_e[i] . x_t) for pair p = t*K+k, e = topk_idx[p]: one warp
// per (p, i), pair-major.
template <typename W>
__global__ void experts_small_up_kernel(float* h, const float* x, const int32_t* topk_idx,
                                        IndexCheck ic, const void* const* weights, int64_t pairs,
                                        int64_t k, int64_t hidden, int64_t inter) {
  if (blockIdx.x == 0) record_first_bad_index(ic, topk_idx, pairs);
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; row < pairs * inter;
       row += warps) {  // whole warps move together
    const int64_t p = row / inter, i = row % inter;
    const int64_t e = checked_index(ic, topk_idx[p]);
    const float* xt = x + (p / k) * hidden;
    const W* const w[2] = {static_cast<const W*>(weights[3 * e]) + i * hidden,
                           static_cast<const W*>(weights[3 * e + 1]) + i * hidden};
    const float* const a[2] = {xt, xt};
    float acc[2];
    warp_dots<W, 2>(acc, w, a, 2, hidden);
    if ((threadIdx.x & 31) == 0) h[row] = acc[0] / (1.0f + expf(-acc[0])) * acc[1];
  }
}

// y[t, j] (+)= sum_k topk_w[t*K+k] * (down_e[j] . h[t*K+k]), k in increasing order: one warp per
// (t, j), up to kSmallDownRows top-k slots streamed at once.
template <typename W>
__global__ void experts_small_down_kernel(float* y, const float* h, const int32_t* topk_idx,
                                          IndexCheck ic, const float* topk_w,
                                          const void* const* weights, int64_t tokens, int64_t k,
                                          int64_t hidden, int64_t inter, bool accumulate) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; row < tokens * hidden;
       row += warps) {
    const int64_t t = row / hidden, j = row % hidden;
    float out = 0.0f;
    for (int64_t k0 = 0; k0 < k; k0 += kSmallDownRows) {
      const int nr = int(k - k0 < kSmallDownRows ? k - k0 : kSmallDownRows);
      const W* w[kSmallDownRows];
      const float* a[kSmallDownRows];
#pragma unroll
      for (int r = 0; r < kSmallDownRows; ++r) {
        const int64_t p = t * k + k0 + (r < nr ? r : 0);
        w[r] = static_cast<const W*>(weights[3 * int64_t(checked_index(ic, topk_idx[p])) + 2]) +
               j * inter;
        a[r] = h + p * inter;
      }
      float acc[kSmallDownRows];
      warp_dots<W, kSmallDownRows>(acc, w, a, nr, inter);
#pragma unroll
      for (int r = 0; r < kSmallDownRows; ++r)
        if (r < nr) out += topk_w[t * k + k0 + r] * acc[r];
    }
    if ((threadIdx.x & 31) == 0) y[row] = accumulate ? y[row] + out : out;
  }
}

template <typename W>
cudaError_t experts_small(float* y, float* h, const float* x, const int32_t* topk_idx,
                          const IndexCheck& ic, const float* topk_w, const void* const* weights,
                          int64_t tokens, int64_t k, int64_t hidden, int64_t inter,
                          bool accumulate) {
  constexpr int warps_per_block = kSmallThreads / 32;
  auto grid = [](int64_t rows) {  // one warp per row; the loops stride over any rest
    const int64_t b = (rows + warps_per_block - 1) / warps_per_block;
    return unsigned(b < 1 ? 1 : (b < (int64_t(1) << 20) ? b : (int64_t(1) << 20)));
  };
  experts_small_up_kernel<W><<<grid(tokens * k * inter), kSmallThreads, 0, stream()>>>(
      h, x, topk_idx, ic, weights, tokens * k, k, hidden, inter);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  IndexCheck down_ic = ic;
  down_ic.slot = nullptr;  // recorded by the up pass
  experts_small_down_kernel<W><<<grid(tokens * hidden), kSmallThreads, 0, stream()>>>(
      y, h, topk_idx, down_ic, topk_w, weights, tokens, k, hidden, inter, accumulate);
  return cudaGetLastError();
}

}  // namespace

cudaError_t moe_experts_small(float* y, float* h, const float* x, const int32_t* topk_idx,
                              const IndexCheck& experts_check, const float* topk_w,
                              const void* const* weights, bool bf16, int64_t tokens, int64_t k,
                              int64_t hidden, int64_t inter, bool accumulate) {
  if (tokens == 0 || hidden == 0) return cudaSuccess;
  return bf16 ? experts_small<uint16_t>(y, h, x, topk_idx, experts_check, topk_w, weights, tokens,
                                        k, hidden, inter, accumulate)
              : experts_small<float>(y, h, x, topk_idx, experts_check, topk_w, weights, tokens, k,
                                     hidden, inter, accumulate);
}

// ---------------------------------------------------------------------------------------------
// Gate: one block per token; the expert scores live in shared memory.

namespace {

constexpr int kGateThreads = 128;

// (value, index) order of the CPU top_k: larger value first, ties to the lower index; an empty
// slot (index < 0) loses to anything.
__device__ inline bool beats(float v, int i, float bv, int bi) {
  return bi < 0 || v > bv || (v == bv && i < bi);
}

// The best not-yet-taken entry of v[0, n) by `beats`, returned to every thread.
__device__ int block_argmax(const float* v, const unsigned char* taken, int n, float* wv, int* wi) {
  float bv = -INFINITY;
  int bi = -1;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    if (!taken[i] && beats(v[i], i, bv, bi)) {
      bv = v[i];
      bi = i;
    }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && beats(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    wv[warp] = bv;
    wi[warp] = bi;
  }
  __syncthreads();
  bv = -INFINITY;
  bi = -1;
  for (int w = 0; w < int(blockDim.x >> 5); ++w)
    if (wi[w] >= 0 && beats(wv[w], wi[w], bv, bi)) {
      bv = wv[w];
      bi = wi[w];
    }
  return bi;
}

// Group score: the best choice in the group (group_limited_greedy) or the sum of the two best
// (noaux_tc), exactly as the CPU backend computes it.
__device__ float group_score(const float* c, int per_group, TopkMethod method) {
  if (method == TopkMethod::GroupLimitedGreedy) {
    float m = c[0];
    for (int i = 1; i < per_group; ++i) m = fmaxf(m, c[i]);
    return m;
  }
  float a = -INFINITY, b = -INFINITY;
  for (int i = 0; i < per_group; ++i) {
    if (c[i] > a) {
      b = a;
      a = c[i];
    } else if (c[i] > b) {
      b = c[i];
    }
  }
  return per_group > 1 ? a + b : a;
}

__global__ void moe_gate_forward_kernel(int32_t* topk_idx, float* topk_w, float* scores,
                                        const float* logits, const float* bias, GateLaunch g) {
  extern __shared__ float gate_smem[];
  __shared__ float red[32], wv[32];
  __shared__ int wi[32];
  const int E = int(g.p.n_experts), K = int(g.p.top_k), G = int(g.p.n_group);
  const int per_group = E / G;
  float* s = gate_smem;                                        // [E] scores
  float* choice = s + E;                                       // [E] selection scores
  float* gscore = choice + E;                                  // [G]
  auto* taken = reinterpret_cast<unsigned char*>(gscore + G);  // [E + G]
  const int64_t t = blockIdx.x;
  const float* l = logits + t * E;

  if (g.p.scoring == ScoringFunc::Softmax) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < E; i += blockDim.x) m = fmaxf(m, l[i]);
    m = block_reduce(m, -INFINITY, red, Max{});
    float z = 0.0f;
    for (int i = threadIdx.x; i < E; i += blockDim.x) z += (s[i] = expf(l[i] - m));
    z = block_reduce(z, 0.0f, red, Sum{});
    for (int i = threadIdx.x; i < E; i += blockDim.x) s[i] /= z;
  } else {
    for (int i = threadIdx.x; i < E; i += blockDim.x) s[i] = 1.0f / (1.0f + expf(-l[i]));
  }
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    scores[t * E + i] = s[i];
    choice[i] = s[i] + (bias ? bias[i] : 0.0f);  // the bias steers selection, never the weights
    taken[i] = 0;
  }
  __syncthreads();

  if (g.p.method != TopkMethod::Greedy && G > 1) {
    for (int gi = threadIdx.x; gi < G; gi += blockDim.x) {
      gscore[gi] = group_score(choice + gi * per_group, per_group, g.p.method);
      taken[E + gi] = 0;
    }
    __syncthreads();
    unsigned char* keep = taken + E;  // reused: 1 = group kept
    for (int k = 0; k < int(g.p.topk_group); ++k) {
      const int best = block_argmax(gscore, keep, G, wv, wi);
      if (threadIdx.x == 0) keep[best] = 1;
      __syncthreads();
    }
    for (int i = threadIdx.x; i < E; i += blockDim.x)
      if (!keep[i / per_group]) choice[i] = -INFINITY;
    __syncthreads();
  }

  for (int k = 0; k < K; ++k) {
    const int best = block_argmax(choice, taken, E, wv, wi);
    if (threadIdx.x == 0) {
      taken[best] = 1;
      topk_idx[t * K + k] = best;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {  // K is small: one thread, in the CPU's summation order
    const int32_t* idx = topk_idx + t * K;
    float* w = topk_w + t * K;
    float denom = 0.0f;
    for (int k = 0; k < K; ++k) denom += (w[k] = s[idx[k]]);
    denom += 1e-20f;
    for (int k = 0; k < K; ++k) w[k] = (g.normalise ? w[k] / denom : w[k]) * g.weight_scale;
  }
}

__global__ void moe_gate_backward_kernel(float* dlogits, const float* dtopk_w,
                                         const int32_t* topk_idx, const float* scores,
                                         const float* dscores, GateLaunch g) {
  extern __shared__ float gate_smem[];
  __shared__ float red[32];
  const int E = int(g.p.n_experts), K = int(g.p.top_k);
  const int64_t t = blockIdx.x;
  const float* s = scores + t * E;
  float* ds = gate_smem;
  for (int i = threadIdx.x; i < E; i += blockDim.x) ds[i] = dscores ? dscores[t * E + i] : 0.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int32_t* idx = topk_idx + t * K;
    const float* dw = dtopk_w + t * K;
    if (g.normalise) {
      // w_k = c z_k / D, D = sum z: dz_k = c (dw_k - sum_j dw_j z_j / D) / D.
      float denom = 1e-20f, wz = 0.0f;
      for (int k = 0; k < K; ++k) denom += s[idx[k]];
      for (int k = 0; k < K; ++k) wz += dw[k] * s[idx[k]];
      for (int k = 0; k < K; ++k) ds[idx[k]] += g.weight_scale * (dw[k] - wz / denom) / denom;
    } else {
      for (int k = 0; k < K; ++k) ds[idx[k]] += g.weight_scale * dw[k];
    }
  }
  __syncthreads();
  float* dl = dlogits + t * E;
  if (g.p.scoring == ScoringFunc::Softmax) {
    float sum = 0.0f;
    for (int i = threadIdx.x; i < E; i += blockDim.x) sum += ds[i] * s[i];
    sum = block_reduce(sum, 0.0f, red, Sum{});
    for (int i = threadIdx.x; i < E; i += blockDim.x) dl[i] = s[i] * (ds[i] - sum);
  } else {
    for (int i = threadIdx.x; i < E; i += blockDim.x) dl[i] = ds[i] * s[i] * (1.0f - s[i]);
  }
}

}  // namespace

cudaError_t moe_gate_forward(int32_t* topk_idx, float* topk_w, float* scores, const float* logits,
                             const float* bias, const GateLaunch& g, int64_t tokens) {
  if (tokens == 0) return cudaSuccess;
  const size_t smem =
      size_t(2 * g.p.n_experts + g.p.n_group) * sizeof(float) + size_t(g.p.n_experts + g.p.n_group);
  moe_gate_forward_kernel<<<unsigned(tokens), kGateThreads, smem, stream()>>>(
      topk_idx, topk_w, scores, logits, bias, g);
  return cudaGetLastError();
}

cudaError_t moe_gate_backward(float* dlogits, const float* dtopk_w, const int32_t* topk_idx,
                              const float* scores, const float* dscores, const GateLaunch& g,
                              int64_t tokens) {
  if (tokens == 0) return cudaSuccess;
  const size_t smem = size_t(g.p.n_experts) * sizeof(float);
  moe_gate_backward_kernel<<<unsigned(tokens), kGateThreads, smem, stream()>>>(
      dlogits, dtopk_w, topk_idx, scores, dscores, g);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
