// CUDA kernels, part 4: MoE permute plan (pairs stably counting-sorted by expert), token dispatch
// (gather), combine (each token's slots from the plan), the generic scatter-add (through a sorted
// plan), the few-token experts' GEMVs (decode) and the gate (scores, group-limited / noaux_tc
// top-K with the balancing bias, normalisation and scaling) with its backward. Why hand-written:
// the gate's selection rules (DeepSeek-V2/V3 routing, CPU-identical tie breaking) are no library
// routine, and the scatter must be deterministic, which the usual float-atomic scatter is not: the
// combine reads each token's slots in a fixed order from the plan, and the generic scatter stably
// sorts positions by destination (cub radix sort) and lets one block per destination add its
// sources in increasing position order.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <type_traits>

#include "ops/cuda/dependent_launch.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/index_check.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/warp_dots.cuh"

namespace moekit::cuda {

namespace {

// The gather on fp32 or bf16 output storage (bf16: the weighted value rounded once); a negative
// row (a padding slot) writes zeros. A row launch (device_util.cuh's row_loop): each thread moves
// 8 consecutive columns (16-byte accesses where the row width and the buffers allow, else 1) of
// four rows, all four loads in flight before the stores, and no division per element. The grid-
// stride form before (one 8-column chunk per thread and iteration, a 64-bit division each) moved
// V2-Lite's 49,152 x 2048 bf16 rows at ~1.4 TB/s on the H200: 159 us per MoE layer of a prefill.
// The rows are written with the evict-first hint: a prefill's slots (~218 MB for V2-Lite's 8192
// tokens) stream through L2 and would evict the source rows (33 MB), each read by K slots.
// The rows are range-checked here (block 0 records the first bad one, index_check.cuh) rather than
// by a check kernel and a checked copy first: a 4-layer ESFT step gathers ~26 times, each check a
// launch of its own.
template <typename T, typename X, int V>
struct GatherRows {
  T* out;
  const X* x;
  const int32_t* rows;
  const float* weights;
  IndexCheck ic;
  int64_t dim;
  struct Regs {
    float v[V];
  };
  __device__ void load(int64_t i, int, int u, Regs& g) const {
    const int32_t row = checked_index(ic, rows[i]);
#pragma unroll
    for (int j = 0; j < V; ++j) g.v[j] = 0.0f;
    if (row < 0) return;
    load_n<V>(x + int64_t(row) * dim + int64_t(u) * V, g.v);
    if (weights) {
      const float w = weights[i];
#pragma unroll
      for (int j = 0; j < V; ++j) g.v[j] *= w;
    }
  }
  __device__ void store(int64_t i, int, int u, const Regs& g) const {
    store_n_streaming<V>(out + i * dim + int64_t(u) * V, g.v);
  }
};

template <typename T, typename X, int V>
cudaError_t gather_rows_as(T* out, const X* x, const int32_t* rows, const float* weights, int64_t n,
                           int64_t dim, const IndexCheck& check) {
  return for_each_row_checked(n, 1, dim / V, check, rows, n,
                              GatherRows<T, X, V>{out, x, rows, weights, check, dim});
}

template <typename T, typename X>
cudaError_t gather_rows_to(T* out, const X* x, const int32_t* rows, const float* weights, int64_t n,
                           int64_t dim, const IndexCheck& check) {
  const bool wide = dim % 8 == 0 && all_aligned16(x, out);
  return wide ? gather_rows_as<T, X, 8>(out, x, rows, weights, n, dim, check)
              : gather_rows_as<T, X, 1>(out, x, rows, weights, n, dim, check);
}

template <typename T>
cudaError_t gather_rows_from(T* out, const void* x, DType x_dtype, const int32_t* rows,
                             const float* weights, int64_t n, int64_t dim,
                             const IndexCheck& check) {
  if (x_dtype == DType::BF16)
    return gather_rows_to(out, static_cast<const bf16_t*>(x), rows, weights, n, dim, check);
  return gather_rows_to(out, static_cast<const float*>(x), rows, weights, n, dim, check);
}

int end_bit_for(int64_t num_rows) {
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) < num_rows) ++bits;
  return bits;
}

// Block p handles sorted position p if it starts a run of one destination row: the run's sources
// are added in order (the sort is stable), column-parallel across the block's threads, V columns
// per thread (8: 16-byte loads of a bf16 x, where the width and buffers allow; else 1). x fp32 or
// bf16 (widened exactly). Positions with no row (keyed num_rows by row_plan) sort last and add
// nothing.
template <typename X, int V>
__global__ void scatter_add_planned_kernel(float* out, const X* x, const float* weights,
                                           const int32_t* sorted_rows, const int32_t* order,
                                           int64_t n, int64_t dim, int64_t num_rows) {
  const int64_t p = blockIdx.x;
  const int32_t row = sorted_rows[p];
  if ((p > 0 && sorted_rows[p - 1] == row) || row >= num_rows) return;
  float* dst = out + int64_t(row) * dim;
  for (int64_t c = threadIdx.x * int64_t(V); c < dim; c += int64_t(blockDim.x) * V) {
    float acc[V];
    if constexpr (V == 8)
      load8(dst + c, acc);
    else
      acc[0] = dst[c];
    for (int64_t q = p; q < n && sorted_rows[q] == row; ++q) {
      const int64_t src = order[q];
      const float w = weights ? weights[src] : 1.0f;
      float v[V];
      if constexpr (V == 8)
        load8(x + src * dim + c, v);
      else
        v[0] = to_f32(x[src * dim + c]);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += w * v[j];
    }
    if constexpr (V == 8)
      store8(dst + c, acc);
    else
      dst[c] = acc[0];
  }
}

template <typename X, int V>
cudaError_t scatter_add_planned_as(float* out, const X* x, const float* weights,
                                   const int32_t* sorted_rows, const int32_t* order, int64_t n,
                                   int64_t dim, int64_t num_rows) {
  const int64_t per_row = dim / V;
  const int threads = per_row >= 256 ? 256 : (per_row >= 128 ? 128 : 64);
  scatter_add_planned_kernel<X, V><<<unsigned(n), threads, 0, stream()>>>(
      out, x, weights, sorted_rows, order, n, dim, num_rows);
  return cudaGetLastError();
}

template <typename X>
cudaError_t scatter_add_planned_to(float* out, const X* x, const float* weights,
                                   const int32_t* sorted_rows, const int32_t* order, int64_t n,
                                   int64_t dim, int64_t num_rows) {
  if (dim % 8 == 0 && all_aligned16(out, x))
    return scatter_add_planned_as<X, 8>(out, x, weights, sorted_rows, order, n, dim, num_rows);
  return scatter_add_planned_as<X, 1>(out, x, weights, sorted_rows, order, n, dim, num_rows);
}

}  // namespace

cudaError_t gather_rows(void* out, DType out_dtype, const void* x, DType x_dtype,
                        const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                        const IndexCheck& check) {
  if (out_dtype == DType::I32) {
    // Index tensors of a few thousand entries (1-D, dim 1): one element per thread is plenty, and
    // a plain int copy (no pass through fp32) keeps every value.
    int32_t* o = static_cast<int32_t*>(out);
    const int32_t* xi = static_cast<const int32_t*>(x);
    return for_each_checked(n * dim, check, rows, n, [=] __device__(int64_t e) {
      const int32_t row = checked_index(check, rows[e / dim]);
      o[e] = row < 0 ? 0 : xi[int64_t(row) * dim + e % dim];
    });
  }
  if (out_dtype == DType::BF16)
    return gather_rows_from(static_cast<bf16_t*>(out), x, x_dtype, rows, weights, n, dim, check);
  return gather_rows_from(static_cast<float*>(out), x, x_dtype, rows, weights, n, dim, check);
}

// Keys of a row plan: the rows, with "no row" (negative) keyed num_rows so that it sorts last;
// end_bit_for(num_rows + 1) low bits order them.
size_t row_plan_temp_bytes(int64_t n, int64_t num_rows) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), n, 0, end_bit_for(num_rows + 1));
  return bytes;
}

cudaError_t row_plan(void* temp, size_t temp_bytes, const int32_t* rows, int32_t* keys,
                     int32_t* sorted_rows, int32_t* iota, int32_t* order, int64_t n,
                     int64_t num_rows) {
  if (n == 0) return cudaSuccess;
  cudaError_t e = for_each(n, [=] __device__(int64_t i) {
    iota[i] = int32_t(i);
    keys[i] = rows[i] < 0 ? int32_t(num_rows) : rows[i];
  });
  if (e != cudaSuccess) return e;
  // Keys are valid rows or num_rows (rows checked by the caller).
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, sorted_rows, iota, order, n, 0,
                                         end_bit_for(num_rows + 1));
}

cudaError_t scatter_add_planned(float* out, const void* x, DType x_dtype, const float* weights,
                                const int32_t* sorted_rows, const int32_t* order, int64_t n,
                                int64_t dim, int64_t num_rows) {
  if (n == 0 || dim == 0) return cudaSuccess;
  if (x_dtype == DType::BF16)
    return scatter_add_planned_to(out, static_cast<const bf16_t*>(x), weights, sorted_rows, order,
                                  n, dim, num_rows);
  return scatter_add_planned_to(out, static_cast<const float*>(x), weights, sorted_rows, order, n,
                                dim, num_rows);
}

namespace {

// The permute plan as a stable counting sort in two launches. It was a cub radix sort of the
// pairs by expert, a one-block kernel for the offsets and two maps, behind an index-check kernel:
// seven launches, ~45 us of a V2-Lite prefill's MoE layer on the H200 (8192 x 6 pairs), most of it
// the gaps between them; and the combine sorted the slots by token again (another ~45 us). Here
// block b takes the pairs [b * chunk, (b + 1) * chunk): the first pass counts them per expert, the
// second sums every block's counts (each block for itself: a few thousand cached loads, cheaper
// than a launch), scans the padded totals and places its pairs. Within a block, 256 pairs at a
// time: a pair's rank among the earlier pairs of its expert is the count in earlier warps (a table
// per warp in shared memory) plus its rank in its own warp (__match_any_sync); pairs keep their
// order within an expert, so the slots are the CPU's.
constexpr int kPlanThreads = 256, kPlanWarps = kPlanThreads / 32;
constexpr int64_t kPlanMinChunk = 512, kPlanMaxBlocks = 256;

int64_t plan_chunk(int64_t n) {
  int64_t chunk = kPlanMinChunk;  // a multiple of kPlanThreads
  while ((n + chunk - 1) / chunk > kPlanMaxBlocks) chunk *= 2;
  return chunk;
}

// counts [blocks][E + 1]: block b's pairs per expert, then whether its chunk holds a bad expert
// index (the place pass then finds the first one: the scan over all pairs runs only then).
__global__ void __launch_bounds__(kPlanThreads)
    plan_count_kernel(int32_t* counts, const int32_t* topk_idx, IndexCheck ic, int64_t n,
                      int64_t chunk, int n_experts) {
  extern __shared__ int32_t hist[];  // [n_experts]
  allow_dependents();
  wait_for_inputs();
  for (int e = threadIdx.x; e < n_experts; e += kPlanThreads) hist[e] = 0;
  __syncthreads();
  const int64_t i0 = blockIdx.x * chunk, i1 = min(n, i0 + chunk);
  bool bad = false;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kPlanThreads) {
    const int32_t e = topk_idx[i];
    bad = bad || !index_ok(ic, e);
    atomicAdd(&hist[checked_index(ic, e)], 1);  // integer counts: any order
  }
  bad = __syncthreads_or(bad) != 0;
  int32_t* mine = counts + blockIdx.x * int64_t(n_experts + 1);
  for (int e = threadIdx.x; e < n_experts; e += kPlanThreads) mine[e] = hist[e];
  if (threadIdx.x == 0) mine[n_experts] = bad ? 1 : 0;
}

struct PlanPlace {
  DispatchPlanBuffers b;
  const int32_t* topk_idx;
  IndexCheck ic;
  const float* topk_w;
  int64_t n, k, chunk, slots;
  int n_experts, align;
};

// Shared memory of the place pass: warp_rows [kPlanWarps][E], next [E] (the block's next slot of
// each expert), total [E], begin [E + 1].
size_t plan_place_smem(int64_t n_experts) {
  return size_t((kPlanWarps + 3) * n_experts + 1) * sizeof(int32_t);
}

// The padded begins: begin[e] = sum over e' < e of total[e'] rounded up to align; begin[E] the
// slots used. Thread i scans the experts [i * per, (i + 1) * per) on its own, then the block scans
// the threads' sums.
__device__ void plan_scan(int32_t* begin, const int32_t* total, int n_experts, int align) {
  using Scan = cub::BlockScan<int32_t, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan;
  const int per = (n_experts + kPlanThreads - 1) / kPlanThreads;
  const int e0 = int(threadIdx.x) * per, e1 = min(n_experts, e0 + per);
  auto padded = [&](int e) { return (total[e] + align - 1) / align * align; };
  int32_t sum = 0;
  for (int e = e0; e < e1; ++e) sum += padded(e);
  int32_t before = 0, all = 0;
  Scan(scan).ExclusiveSum(sum, before, all);
  for (int e = e0; e < e1; ++e) {
    begin[e] = before;
    before += padded(e);
  }
  if (threadIdx.x == 0) begin[n_experts] = all;
}

__global__ void __launch_bounds__(kPlanThreads) plan_place_kernel(PlanPlace p) {
  extern __shared__ int32_t plan_smem[];
  const int E = p.n_experts, nb = int(gridDim.x), blk = int(blockIdx.x);
  int32_t* warp_rows = plan_smem;
  int32_t* next = warp_rows + kPlanWarps * E;
  int32_t* total = next + E;
  int32_t* begin = total + E;
  __shared__ int32_t part_before[kPlanThreads], part_all[kPlanThreads];
  allow_dependents();
  wait_for_inputs();
  // A bad expert index anywhere: block 0 records the first (the whole scan, on this path only).
  if (blk == 0) {
    bool bad = false;
    for (int q = threadIdx.x; q < nb; q += kPlanThreads)
      bad = bad || p.b.counts[q * int64_t(E + 1) + E] != 0;
    if (__syncthreads_or(bad)) record_first_bad_index(p.ic, p.topk_idx, p.n);
  }
  // Each expert's pairs in the blocks before this one, and in all blocks: `parts` threads per
  // expert (when E < kPlanThreads) share its column of counts, so that many loads are in flight
  // (one thread walking 96 blocks' counts took ~14 us of dependent cache round trips).
  const int parts = E >= kPlanThreads ? 1 : kPlanThreads / E, width = kPlanThreads / parts;
  for (int e0 = 0; e0 < E; e0 += width) {
    const int e = e0 + int(threadIdx.x) % width, part = int(threadIdx.x) / width;
    int32_t before = 0, all = 0;
    if (e < E && part < parts) {
#pragma unroll 4
      for (int q = part; q < nb; q += parts) {
        const int32_t c = p.b.counts[q * int64_t(E + 1) + e];
        before += q < blk ? c : 0;
        all += c;
      }
    }
    part_before[threadIdx.x] = before;
    part_all[threadIdx.x] = all;
    __syncthreads();
    if (int(threadIdx.x) < width && e0 + int(threadIdx.x) < E) {
      const int ee = e0 + int(threadIdx.x);
      int32_t sum_before = 0, sum_all = 0;
      for (int q = 0; q < parts; ++q) {
        sum_before += part_before[q * width + threadIdx.x];
        sum_all += part_all[q * width + threadIdx.x];
      }
      next[ee] = sum_before;
      total[ee] = sum_all;
      for (int w = 0; w < kPlanWarps; ++w) warp_rows[w * E + ee] = 0;
    }
    __syncthreads();  // part_* reused by the next round
  }
  plan_scan(begin, total, E, p.align);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kPlanThreads) {
    next[e] += begin[e];
    if (blk == 0) {
      p.b.expert_begin[e] = begin[e];
      p.b.expert_rows[e] = total[e];
    }
  }
  if (blk == 0 && threadIdx.x == 0) p.b.expert_begin[E] = begin[E];
  // Padding: each expert's rest of its block (expert e by block e % nb), and the slots past the
  // last block.
  auto pad = [&](int64_t s) {
    p.b.slot_token[s] = -1;
    p.b.slot_pair[s] = -1;
    p.b.slot_weight[s] = 0.0f;
  };
  for (int e = blk; e < E; e += nb)
    for (int64_t s = begin[e] + total[e] + threadIdx.x; s < begin[e + 1]; s += kPlanThreads) pad(s);
  for (int64_t s = begin[E] + blk * int64_t(kPlanThreads) + threadIdx.x; s < p.slots;
       s += int64_t(nb) * kPlanThreads)
    pad(s);
  __syncthreads();  // next[] complete

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i0 = blk * p.chunk, i1 = min(p.n, i0 + p.chunk);
  for (int64_t base = i0; base < i1; base += kPlanThreads) {
    const int64_t i = base + threadIdx.x;
    const bool live = i < i1;
    const int e = live ? checked_index(p.ic, p.topk_idx[i]) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (live && rank == 0) warp_rows[warp * E + e] = __popc(peers);
    __syncthreads();
    if (live) {
      int32_t slot = next[e] + rank;
      for (int w = 0; w < warp; ++w) slot += warp_rows[w * E + e];
      const int64_t t = i / p.k, j = i % p.k;
      p.b.slot_pair[slot] = int32_t(i);
      p.b.slot_token[slot] = int32_t(t);
      p.b.slot_weight[slot] = p.topk_w[i];
      // Its place among the token's slots: slots grow with the expert, then with the pair (the
      // second only matters for a repeated expert, i.e. a bad index replaced: still a permutation).
      int pos = 0;
      for (int64_t q = 0; q < p.k; ++q) {
        const int eq = checked_index(p.ic, p.topk_idx[t * p.k + q]);
        pos += (eq < e || (eq == e && q < j)) ? 1 : 0;
      }
      p.b.token_slots[t * p.k + pos] = slot;
    }
    __syncthreads();  // every pair read warp_rows
    for (int e2 = threadIdx.x; e2 < E; e2 += kPlanThreads) {
      int32_t sum = 0;
      for (int w = 0; w < kPlanWarps; ++w) {
        sum += warp_rows[w * E + e2];
        warp_rows[w * E + e2] = 0;
      }
      next[e2] += sum;
    }
    __syncthreads();
  }
}

// The combine, a row op (device_util.cuh) over tokens: a thread takes V columns of one token and
// adds its slots' rows in order, four loads in flight (a row already has K of them: one row per
// thread). V2-Lite's prefill (8192 tokens, K = 6): 103 us on the H200, against 93 for the kernel
// over a sorted plan, which took ~45 us of sorting first; eight loads in flight ran at 167 us. The
// same expression per term as scatter_add_planned_kernel.
template <typename X, int V>
struct CombineRows {
  float* out;
  const X* x;
  const float* weights;
  const int32_t* token_slots;
  IndexCheck ic;
  int64_t k, dim;
  static constexpr int kRowsPerThread = 1;
  struct Regs {
    float acc[V];
  };
  __device__ void load(int64_t t, int, int u, Regs& g) const {
    const int64_t c = int64_t(u) * V;
    load_n<V>(out + t * dim + c, g.acc);
    constexpr int kBatch = 4;
    for (int64_t j0 = 0; j0 < k; j0 += kBatch) {
      float v[kBatch][V], w[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        w[q] = 0.0f;
        if (j0 + q >= k) continue;
        const int64_t s = checked_index(ic, token_slots[t * k + j0 + q]);
        w[q] = weights ? weights[s] : 1.0f;
        load_n<V>(x + s * dim + c, v[q]);
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        if (j0 + q >= k) continue;
#pragma unroll
        for (int i = 0; i < V; ++i) g.acc[i] += w[q] * v[q][i];
      }
    }
  }
  __device__ void store(int64_t t, int, int u, const Regs& g) const {
    store_n<V>(out + t * dim + int64_t(u) * V, g.acc);
  }
};

template <typename X, int V>
cudaError_t moe_combine_as(float* out, const X* x, const float* weights, const int32_t* token_slots,
                           const IndexCheck& check, int64_t tokens, int64_t k, int64_t dim) {
  return for_each_row_checked(tokens, 1, dim / V, check, token_slots, tokens * k,
                              CombineRows<X, V>{out, x, weights, token_slots, check, k, dim});
}

template <typename X>
cudaError_t moe_combine_to(float* out, const X* x, const float* weights, const int32_t* token_slots,
                           const IndexCheck& check, int64_t tokens, int64_t k, int64_t dim) {
  const bool wide = dim % 8 == 0 && all_aligned16(x, out);
  return wide ? moe_combine_as<X, 8>(out, x, weights, token_slots, check, tokens, k, dim)
              : moe_combine_as<X, 1>(out, x, weights, token_slots, check, tokens, k, dim);
}

}  // namespace

int64_t moe_plan_blocks(int64_t n) {
  return std::max<int64_t>(1, (n + plan_chunk(n) - 1) / plan_chunk(n));
}

cudaError_t moe_dispatch_plan(const DispatchPlanBuffers& b, const int32_t* topk_idx,
                              const IndexCheck& check, const float* topk_w, int64_t n, int64_t k,
                              int64_t n_experts, int64_t align, int64_t slots) {
  if (n_experts < 1 || n_experts > kPlanMaxExperts) return cudaErrorInvalidValue;
  const int64_t chunk = plan_chunk(n), blocks = moe_plan_blocks(n);
  cudaError_t e = launch_dependent_smem(plan_count_kernel, dim3(unsigned(blocks)),
                                        dim3(kPlanThreads), size_t(n_experts) * sizeof(int32_t),
                                        b.counts, topk_idx, check, n, chunk, int(n_experts));
  if (e != cudaSuccess) return e;
  // Past ~1,090 experts the tables and the scan's static storage exceed the default 48 KiB: opt
  // in once for the largest size this takes.
  static const cudaError_t attr =
      cudaFuncSetAttribute(plan_place_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           int(plan_place_smem(kPlanMaxExperts)));
  if (attr != cudaSuccess) return attr;
  const size_t smem = plan_place_smem(n_experts);
  const PlanPlace p{b, topk_idx, check, topk_w, n, k, chunk, slots, int(n_experts), int(align)};
  return launch_dependent_smem(plan_place_kernel, dim3(unsigned(blocks)), dim3(kPlanThreads), smem,
                               p);
}

cudaError_t moe_combine(float* out, const void* x, DType x_dtype, const float* weights,
                        const int32_t* token_slots, const IndexCheck& check, int64_t tokens,
                        int64_t k, int64_t dim) {
  if (k < 1 || k > kCombineMaxK) return cudaErrorInvalidValue;
  if (x_dtype == DType::BF16)
    return moe_combine_to(out, static_cast<const bf16_t*>(x), weights, token_slots, check, tokens,
                          k, dim);
  return moe_combine_to(out, static_cast<const float*>(x), weights, token_slots, check, tokens, k,
                        dim);
}

// ---------------------------------------------------------------------------------------------
// Few-token experts (decode): GEMVs straight from the routing. At a handful of tokens every
// expert GEMM is a matrix-vector product, bound by reading the weights; cuBLAS would need the
// per-expert row counts on the host (a sync) and a launch per expert and projection. Two passes:
// up (gate and up projections, then SwiGLU) into h, then down with the combine. Weights are read
// as stored (fp32 or bf16, widened exactly); activations stay fp32; every sum has a fixed order
// (deterministic, no atomics). The routing's expert ids are range-checked here (IndexCheck): the
// up pass records a bad one, both passes use the replacement. The shared experts (SmallShared),
// when given, ride along in both passes: their rows are extra warps of the up pass, and each down
// block adds their term after the routed ones, so they cost a decode step no launch of their own.

namespace {

constexpr int kSmallThreads = 256;  // up pass: 8 warps per block

// h[p, i] = silu(gate_e[i] . x_t) * (up_e[i] . x_t) for pair p = t*K+k, e = topk_idx[p]: one warp
// per (p, i), pair-major, each lane streaming 16-byte chunks of the two weight rows (warp_dots).
// Then the shared experts' rows, sh.h[t, i] = silu(gate_s[i] . x_t) * (up_s[i] . x_t), as rows
// pairs * inter + t * sh.inter + i of the same grid (the same work per warp: two rows of length
// hidden). Measured on the H200 (V2-Lite decode, T = 1, K = 6, H 2048, I 1408, bf16, routed rows
// only): 20.2 us for 69 MB, ~72% of the HBM bandwidth, so it stays as it is.
template <typename W>
__global__ void experts_small_up_kernel(float* h, const float* x, const int32_t* topk_idx,
                                        IndexCheck ic, const void* const* weights, SmallShared sh,
                                        int64_t tokens, int64_t k, int64_t hidden, int64_t inter) {
  allow_dependents();
  wait_for_inputs();
  const int64_t pairs = tokens * k;
  if (blockIdx.x == 0) record_first_bad_index(ic, topk_idx, pairs);
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  const int64_t routed_rows = pairs * inter, rows = routed_rows + tokens * sh.inter;
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; row < rows;
       row += warps) {  // whole warps move together (row and the branch are per warp)
    const W* w[2];
    const float* xt;
    float* out;
    if (row < routed_rows) {
      const int64_t p = row / inter, i = row % inter;
      const int64_t e = checked_index(ic, topk_idx[p]);
      xt = x + (p / k) * hidden;
      w[0] = static_cast<const W*>(weights[3 * e]) + i * hidden;
      w[1] = static_cast<const W*>(weights[3 * e + 1]) + i * hidden;
      out = h + row;
    } else {  // only reached with sh.inter > 0
      const int64_t r = row - routed_rows, t = r / sh.inter, i = r % sh.inter;
      xt = x + t * hidden;
      w[0] = static_cast<const W*>(sh.gate) + i * hidden;
      w[1] = static_cast<const W*>(sh.up) + i * hidden;
      out = sh.h + r;
    }
    const float* const a[2] = {xt, xt};
    float acc[2];
    warp_dots<W, 2>(acc, w, a, 2, hidden);
    if ((threadIdx.x & 31) == 0) *out = acc[0] / (1.0f + expf(-acc[0])) * acc[1];
  }
}

// The down pass, y[t, j] (+)= sum_k topk_w[t*K+k] * (down_e[j] . h[t*K+k]). It was one warp per
// (t, j) dotting the K rows down_e[j]: measured 23.2 us for 34.6 MB on the H200 (V2-Lite decode,
// ~31% of the bandwidth): 2048 warps with few loads in flight each, and every 16-byte weight load
// paired with two 16-byte loads of h. Now a block takes kDownRows consecutive outputs j of one
// token and splits the inner dimension over its threads: thread c owns the V-wide column chunks
// c, c + blockDim, ... (V = 8 bf16 or 4 fp32: one 16-byte weight load). Per chunk and top-k slot
// it loads h's chunk once, pre-scaled by topk_w, and streams that chunk of the kDownRows weight
// rows: kDownRows independent 16-byte loads reusing the same registers of h (bf16: two slots
// unrolled, 16 loads in flight per thread), no shuffles in the loop. The block then sums its
// threads' partials per row in a fixed tree (warp shuffles, then the warps in order through shared
// memory): deterministic. V2-Lite: 176 bf16 chunks per row, so blocks of 192 threads, 256 blocks
// per token (two per SM), each thread issuing 8 loads per slot; expected ~10 us (>= 70% of the
// bandwidth). Rows misaligned for 16-byte loads (inter not a multiple of V, or a weight at an odd
// address) take the same code with V = 1. The shared experts, when given, are one more pass of the
// same block after the routed slots: their down rows dotted with sh.h[t] at scale 1 (exact), added
// into the same per-thread partial sums before the fixed tree, so each output's order stays fixed
// (routed chunks and slots, then the shared chunks). V2-Lite: 2816 more elements per row against
// the routed 6 x 1408 (two rounds of chunks for the 192 threads), 1.33x the block's work in one
// launch instead of three.
constexpr int kDownRows = 8;   // outputs j per block (the reuse of each load of h)
constexpr int kDownSlots = 8;  // top-k slots whose pointers are staged at once (K > 8: more)
constexpr int kDownMaxThreads = 256;

// Loads V consecutive weights widened to fp32: one 16-byte load (V = Chunk<W>::n) or one element.
// Read-only loads (__ldg): the pointers come from shared memory, so the compiler could not tell
// that they are global.
template <typename W, int V>
__device__ inline void load_weights(const W* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_f32(__ldg(p));
  } else {
    using Vec = std::conditional_t<std::is_same_v<W, float>, float4, uint4>;  // Chunk's type
    const Vec v = __ldg(reinterpret_cast<const Vec*>(p));
    Chunk<W>::load(reinterpret_cast<const W*>(&v), out);  // the widening, from registers
  }
}

// s * p[0, V), V = 1, 4 or 8 (16-byte aligned for V > 1).
template <int V>
__device__ inline void load_scaled(const float* p, float s, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = s * __ldg(p);
  } else {
#pragma unroll
    for (int q = 0; q < V; q += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + q));
      out[q] = s * v.x;
      out[q + 1] = s * v.y;
      out[q + 2] = s * v.z;
      out[q + 3] = s * v.w;
    }
  }
}

// One pass's slots: down_e rows from the tile's first output, h rows, topk_w.
template <typename W>
struct DownSlots {
  const W* w[kDownSlots];
  const float* h[kDownSlots];
  float scale[kDownSlots];
};

// part[r] += sum over this thread's chunks, then the slots s < ns in order, of
// w[s][r * inter + chunk] . (scale[s] * h[s][chunk]) for rows r < nr (part[r >= nr] holds
// garbage); chunk = V elements, V divides inter.
template <typename W, int V>
__device__ inline void down_partials(float (&part)[kDownRows], const DownSlots<W>& sl, int ns,
                                     int nr, int64_t inter) {
  // Slots unrolled: bf16 keeps two slots' 16 loads in flight per thread (112 registers). fp32
  // unrolls none: its rows have twice the chunks (more per thread), and two slots spilled.
  constexpr int kSlotUnroll = sizeof(W) == 2 ? 2 : 1;
  const int64_t chunks = inter / V;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
#pragma unroll kSlotUnroll
    for (int s = 0; s < ns; ++s) {
      float hv[V];
      load_scaled<V>(sl.h[s] + c * V, sl.scale[s], hv);
      const W* w = sl.w[s] + c * V;
      // All kDownRows loads first, then the math. Rows past the end (a last partial tile) reread
      // row 0 and are never written: no branches between the loads.
      float wv[kDownRows][V];
#pragma unroll
      for (int r = 0; r < kDownRows; ++r) load_weights<W, V>(w + (r < nr ? r : 0) * inter, wv[r]);
#pragma unroll
      for (int r = 0; r < kDownRows; ++r)
#pragma unroll
        for (int i = 0; i < V; ++i) part[r] = fmaf(wv[r][i], hv[i], part[r]);
    }
  }
}

template <typename W>
__global__ void __launch_bounds__(kDownMaxThreads)
    experts_small_down_kernel(float* y, const float* h, const int32_t* topk_idx, IndexCheck ic,
                              const float* topk_w, const void* const* weights, SmallShared sh,
                              int64_t tokens, int64_t k, int64_t hidden, int64_t inter,
                              bool accumulate) {
  constexpr int V = Chunk<W>::n;
  __shared__ float red[kDownRows][kDownMaxThreads / 32];
  __shared__ DownSlots<W> slots;
  allow_dependents();
  wait_for_inputs();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t tiles = (hidden + kDownRows - 1) / kDownRows;
  for (int64_t b = blockIdx.x; b < tokens * tiles; b += gridDim.x) {  // uniform per block
    const int64_t t = b / tiles, j0 = (b % tiles) * kDownRows;
    const int nr = int(hidden - j0 < kDownRows ? hidden - j0 : kDownRows);
    float part[kDownRows];
#pragma unroll
    for (int r = 0; r < kDownRows; ++r) part[r] = 0.0f;
    for (int64_t s0 = 0; s0 < k; s0 += kDownSlots) {
      const int ns = int(k - s0 < kDownSlots ? k - s0 : kDownSlots);
      __syncthreads();  // the previous pass is done with `slots`
      bool odd = false;
      if (threadIdx.x < ns) {
        const int s = threadIdx.x;
        const int64_t p = t * k + s0 + s;
        const int64_t e = checked_index(ic, topk_idx[p]);
        slots.w[s] = static_cast<const W*>(weights[3 * e + 2]) + j0 * inter;
        slots.h[s] = h + p * inter;
        slots.scale[s] = topk_w[p];
        // With V | inter every row of the expert and of h then starts 16-byte aligned too.
        odd = !aligned16(slots.w[s]) || !aligned16(slots.h[s]);
      }
      const bool misaligned = __syncthreads_or(odd) != 0;  // and `slots` is written
      if (inter % V == 0 && !misaligned)
        down_partials<W, V>(part, slots, ns, nr, inter);
      else
        down_partials<W, 1>(part, slots, ns, nr, inter);
    }
    if (sh.inter > 0) {  // uniform: a kernel argument
      __syncthreads();   // the routed passes are done with `slots`
      bool odd = false;
      if (threadIdx.x == 0) {
        slots.w[0] = static_cast<const W*>(sh.down) + j0 * sh.inter;
        slots.h[0] = sh.h + t * sh.inter;
        slots.scale[0] = 1.0f;
        odd = !aligned16(slots.w[0]) || !aligned16(slots.h[0]);
      }
      const bool misaligned = __syncthreads_or(odd) != 0;  // and `slots` is written
      if (sh.inter % V == 0 && !misaligned)
        down_partials<W, V>(part, slots, 1, nr, sh.inter);
      else
        down_partials<W, 1>(part, slots, 1, nr, sh.inter);
    }
#pragma unroll
    for (int r = 0; r < kDownRows; ++r) {
      const float v = warp_reduce(part[r], Sum{});
      if (lane == 0) red[r][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < nr) {
      float out = 0.0f;
      for (int q = 0; q < warps; ++q) out += red[threadIdx.x][q];
      const int64_t o = t * hidden + j0 + threadIdx.x;
      y[o] = accumulate ? y[o] + out : out;
    }
    __syncthreads();  // red is reused by the next tile
  }
}

template <typename W>
cudaError_t experts_small(float* y, float* h, const float* x, const int32_t* topk_idx,
                          const IndexCheck& ic, const float* topk_w, const void* const* weights,
                          int64_t tokens, int64_t k, int64_t hidden, int64_t inter, bool accumulate,
                          const SmallShared& sh) {
  auto cap = [](int64_t b) {  // the loops stride over any rest
    return unsigned(b < 1 ? 1 : (b < (int64_t(1) << 20) ? b : (int64_t(1) << 20)));
  };
  constexpr int warps_per_block = kSmallThreads / 32;  // up: one warp per row
  const int64_t up_rows = tokens * k * inter + tokens * sh.inter;
  cudaError_t e = launch_dependent(
      experts_small_up_kernel<W>, dim3(cap((up_rows + warps_per_block - 1) / warps_per_block)),
      dim3(kSmallThreads), h, x, topk_idx, ic, weights, sh, tokens, k, hidden, inter);
  if (e != cudaSuccess) return e;
  // Down: as few rounds of a routed row's chunks per thread as kDownMaxThreads allows, spread
  // evenly over whole warps (V2-Lite bf16: 176 chunks, one round of 192 threads; the shared rows,
  // 352 chunks, then take two). Without routed work (K or I = 0), the shared rows' chunks.
  const int64_t basis = k > 0 && inter > 0 ? inter : sh.inter;  // >= 1: the caller's guard
  const int64_t chunks = (basis + Chunk<W>::n - 1) / Chunk<W>::n;
  const int64_t rounds = (chunks + kDownMaxThreads - 1) / kDownMaxThreads;
  const int64_t per_round = (chunks + rounds - 1) / rounds;
  const int threads = int((per_round + 31) / 32 * 32);  // >= 32: basis >= 1
  IndexCheck down_ic = ic;
  down_ic.slot = nullptr;  // recorded by the up pass
  const int64_t tiles = (hidden + kDownRows - 1) / kDownRows;
  return launch_dependent(experts_small_down_kernel<W>, dim3(cap(tokens * tiles)), dim3(threads), y,
                          h, topk_idx, down_ic, topk_w, weights, sh, tokens, k, hidden, inter,
                          accumulate);
}

}  // namespace

cudaError_t moe_experts_small(float* y, float* h, const float* x, const int32_t* topk_idx,
                              const IndexCheck& experts_check, const float* topk_w,
                              const void* const* weights, bool bf16, int64_t tokens, int64_t k,
                              int64_t hidden, int64_t inter, bool accumulate,
                              const SmallShared& shared) {
  if (tokens == 0 || hidden == 0) return cudaSuccess;
  SmallShared sh = shared;
  if (!sh.gate) sh.inter = 0;  // absent
  return bf16 ? experts_small<uint16_t>(y, h, x, topk_idx, experts_check, topk_w, weights, tokens,
                                        k, hidden, inter, accumulate, sh)
              : experts_small<float>(y, h, x, topk_idx, experts_check, topk_w, weights, tokens, k,
                                     hidden, inter, accumulate, sh);
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

// The gate of a decode step, one warp per token with the scores in registers (lane l holds
// experts l, l + 32, ...): used when no group selection applies (greedy, or one group) and E <= 32
// * kGateWarpMaxSlots. The block kernel above took 5.5 us per layer on the H200 for V2-Lite's one
// token (64 experts, softmax, greedy top-6): six rounds of a block-wide argmax, each with three
// barriers and a pass through shared memory. Here a round is a scan of the lane's own entries and
// a 5-step shuffle tree, with no shared memory or barrier (6.4 us measured, most of it memory
// round trips: the bias was read after the scores were stored, and lane 0 read its weights back
// to normalise them; now one). Same rules and results as the block kernel: the `beats` order
// (ties to the lower index), the bias steering selection only, the weights normalised in the
// CPU's order. Needs top_k <= 32 (lane k writes choice k). Slots: experts per lane, the fewest
// of 1, 2, 4, 8 that hold E (a template argument: the loops over a lane's entries are unrolled and
// every entry costs instructions whether it holds an expert or not, and instructions bound this
// kernel: with 8 slots for V2-Lite's 64 experts it took 24 us for a prefill's 8192 tokens).
constexpr int kGateWarpMaxSlots = 8;  // experts per lane: up to 256 (DeepSeek-V3)
constexpr int kGateWarpsPerBlock = 4;

// v[j] for a j known only at run time, without indexing the register array (local memory).
template <int Slots>
__device__ inline float pick(const float (&v)[Slots], int j) {
  float out = 0.0f;
#pragma unroll
  for (int q = 0; q < Slots; ++q)
    if (q == j) out = v[q];
  return out;
}

template <int Slots>
__global__ void moe_gate_forward_warp_kernel(int32_t* topk_idx, float* topk_w, float* scores,
                                             const float* logits, const float* bias, GateLaunch g,
                                             int64_t tokens) {
  allow_dependents();
  wait_for_inputs();
  const int64_t t = blockIdx.x * int64_t(kGateWarpsPerBlock) + (threadIdx.x >> 5);
  if (t >= tokens) return;  // whole warps
  const int lane = threadIdx.x & 31;
  const int E = int(g.p.n_experts), K = int(g.p.top_k);
  const float* l = logits + t * E;
  // The logits and the bias are read before anything is written (the compiler may not move a
  // bias load past the scores' store: they could alias), so the kernel waits one memory latency.
  float s[Slots], choice[Slots];
#pragma unroll
  for (int j = 0; j < Slots; ++j) {
    const int i = j * 32 + lane;
    s[j] = i < E ? l[i] : -INFINITY;
    choice[j] = i < E && bias ? bias[i] : 0.0f;
  }
  if (g.p.scoring == ScoringFunc::Softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < Slots; ++j) m = fmaxf(m, s[j]);
    m = warp_reduce(m, Max{});
    float z = 0.0f;
#pragma unroll
    for (int j = 0; j < Slots; ++j)
      if (j * 32 + lane < E) z += (s[j] = expf(s[j] - m));
    z = warp_reduce(z, Sum{});
#pragma unroll
    for (int j = 0; j < Slots; ++j) s[j] /= z;
  } else {
#pragma unroll
    for (int j = 0; j < Slots; ++j) s[j] = 1.0f / (1.0f + expf(-s[j]));
  }
#pragma unroll
  for (int j = 0; j < Slots; ++j) {
    const int i = j * 32 + lane;
    if (i >= E) continue;
    scores[t * E + i] = s[j];
    choice[j] += s[j];  // the bias steers selection, never the weights
  }
  unsigned taken = 0;  // bit j: expert j * 32 + lane is taken
  float denom = 0.0f;  // the chosen scores summed in k order, as the CPU (the same in every lane)
  int my_idx = 0;      // lane k < K: the k-th choice and its score
  float my_w = 0.0f;
  for (int k = 0; k < K; ++k) {
    float bv = -INFINITY;
    int bi = -1;
#pragma unroll
    for (int j = 0; j < Slots; ++j) {
      const int i = j * 32 + lane;
      if (i < E && !((taken >> j) & 1u) && beats(choice[j], i, bv, bi)) {
        bv = choice[j];
        bi = i;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {  // a strict total order: every lane ends with the best
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi >= 0 && beats(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    const float sb = __shfl_sync(0xffffffffu, pick<Slots>(s, bi >> 5), bi & 31);  // its score
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    denom += sb;
    if (lane == k) {
      my_idx = bi;
      my_w = sb;
    }
  }
  // Lane k writes choice k: no store is read back.
  denom += 1e-20f;
  if (lane < K) {
    topk_idx[t * K + lane] = my_idx;
    topk_w[t * K + lane] = (g.normalise ? my_w / denom : my_w) * g.weight_scale;
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
  if ((g.p.method == TopkMethod::Greedy || g.p.n_group <= 1) &&
      g.p.n_experts <= 32 * kGateWarpMaxSlots && g.p.top_k <= 32) {
    const int64_t blocks = (tokens + kGateWarpsPerBlock - 1) / kGateWarpsPerBlock;
    const int64_t warps = tokens < kGateWarpsPerBlock ? tokens : kGateWarpsPerBlock;
    const int64_t slots = (g.p.n_experts + 31) / 32;
    auto* kernel = slots <= 1   ? moe_gate_forward_warp_kernel<1>
                   : slots <= 2 ? moe_gate_forward_warp_kernel<2>
                   : slots <= 4 ? moe_gate_forward_warp_kernel<4>
                                : moe_gate_forward_warp_kernel<kGateWarpMaxSlots>;
    return launch_dependent(kernel, dim3(unsigned(blocks)), dim3(unsigned(32 * warps)), topk_idx,
                            topk_w, scores, logits, bias, g, tokens);
  }
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
