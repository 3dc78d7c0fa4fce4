// CUDA kernels of decoding: the causal row softmax of attention over the cache
// (Backend::causal_softmax) and the greedy pick (Backend::argmax), so that a decode step reads
// back one token id, not scores or logits (one block per row: block-wide reductions with fixed
// trees, deterministic, then the write); and the graph-capturable step's latent attention over
// the whole cache buffer (Backend::latent_attention), whose kernels take the lengths from the
// positions in device memory (the step's cache write, set_rows, is in cuda_elementwise.cu).
#include <cmath>

#include "ops/cuda/dependent_launch.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/index_check.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

__global__ void causal_softmax_kernel(float* x, int64_t cols, int64_t group, int64_t offset) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  float* s = x + r * cols;
  const int64_t limit = offset + r / group, n = limit < cols ? limit : cols;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, s[j]);
  m = block_reduce(m, -INFINITY, red, Max{});
  float z = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) z += expf(s[j] - m);
  z = block_reduce(z, 0.0f, red, Sum{});
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s[j] = j < n ? expf(s[j] - m) / z : 0.0f;
}

// Orders (value, index) pairs as one integer: larger value first, then the smaller index (the
// first maximum, as std::max_element). Floats map to unsigned integers in their total order.
__device__ inline unsigned long long argmax_key(float v, int64_t j) {
  const unsigned bits = __float_as_uint(v);
  const unsigned ordered = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<unsigned long long>(ordered) << 32) | (0xffffffffu - unsigned(j));
}

struct MaxKey {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a > b ? a : b;
  }
};

// Block (b, row) takes a slice of the row; its best key goes to best[row] by atomicMax (the
// maximum does not depend on the order, so the pick stays deterministic), and the row's last
// block to finish (counted in done[row]) writes the index and zeroes both slots for the next
// call. One block per row read 102,400 logits in 41 us on an H200 (one load in flight per
// thread), 1 % of a full-model decode step; a row spread over many blocks reads them at once.
constexpr int kArgmaxThreads = 256, kArgmaxPerThread = 8;
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(int32_t* idx, unsigned long long* best, unsigned* done, const float* x,
                  int64_t cols, int64_t n) {
  __shared__ unsigned long long red[32];
  allow_dependents();
  wait_for_inputs();
  const int64_t row = blockIdx.y, per_block = int64_t(kArgmaxThreads) * kArgmaxPerThread;
  const float* r = x + row * cols;
  unsigned long long key = 0;
#pragma unroll
  for (int i = 0; i < kArgmaxPerThread; ++i) {
    const int64_t j = blockIdx.x * per_block + i * kArgmaxThreads + threadIdx.x;
    if (j < n) {
      const unsigned long long k = argmax_key(r[j], j);
      key = k > key ? k : key;
    }
  }
  key = block_reduce(key, 0ull, red, MaxKey{});
  if (threadIdx.x != 0) return;
  atomicMax(&best[row], key);
  __threadfence();  // the maximum lands before the count that lets another block read it
  if (atomicAdd(&done[row], 1u) != gridDim.x - 1) return;
  const unsigned long long b = atomicExch(&best[row], 0ull);
  idx[row] = int32_t(0xffffffffu - unsigned(b & 0xffffffffu));
  done[row] = 0;
}

// ---------------------------------------------------------------------------------------------
// Latent attention, split-K ("flash decoding"). A decode step has one token but thousands of
// cache rows, so the rows are what is spread over the GPU: block (split, head group, token) takes
// the cache rows [split * chunk, split * chunk + chunk) up to the token's position, for the
// kLatentBlockHeads heads of its group. Every cache row is shared by all heads, so the block
// stages kLatentTile rows in shared memory once and each warp reads them for its head; a
// warp keeps its heads' queries and context accumulators in registers (lane l owns the columns
// l, l + 32, ...). Per tile the warp forms the scores (lanes split the r + dr products, a shuffle
// tree sums them; lane t keeps row t's score), then an online softmax update: one rescale of the
// accumulators per tile by exp(m_old - m_new). The (m, l, unnormalised context) partials are
// merged by latent_combine_kernel in split order: no float atomics, deterministic.

constexpr int kLatentWarps = int(kLatentBlockHeads);  // one head per warp
constexpr int kHeadsPerWarp = int(kLatentBlockHeads) / kLatentWarps;
static_assert(kHeadsPerWarp * kLatentWarps == int(kLatentBlockHeads), "heads split over warps");
constexpr int kLatentTile = 16;  // cache rows staged at once; <= 32 (one score per lane)
constexpr int kRankPerLane = int(kLatentMaxRank) / 32;
constexpr int kRopePerLane = int(kLatentMaxRope) / 32;
constexpr int kCombineThreads = 512;  // one column of the rank per thread: each waits on few loads

// dst[i] = src[i] for i in [begin, n) by the whole block, kStageVec elements per thread per
// round with every load of the round issued before its stores.
constexpr int kStageVec = 8;
template <typename T>
__device__ inline void copy_rounds(T* dst, const T* src, int begin, int n) {
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  for (int base = begin; base < n; base += kStageVec * nt) {
    T v[kStageVec];
#pragma unroll
    for (int i = 0; i < kStageVec; ++i) {
      const int e = base + i * nt + tid;
      if (e < n) v[i] = src[e];
    }
#pragma unroll
    for (int i = 0; i < kStageVec; ++i) {
      const int e = base + i * nt + tid;
      if (e < n) dst[e] = v[i];
    }
  }
}

// Starts dst[0, n) = src[0, n) (floats) by the whole block; visible after stage_wait() and a
// __syncthreads(). Where both ends are 16-byte aligned and n % 4 == 0 (the cache rows of
// DeepSeek's 512 + 64 widths) it issues asynchronous 16-byte copies straight into shared memory
// (cp.async, sm_80+): every load of a tile (both buffers) is in flight at once and holds no
// register, so a one-tile split waits one memory latency for its whole tile (the register-staged
// copy waited one per round of kStageVec loads, three per tile at 4 warps). Else a plain copy.
__device__ inline void stage_rows(float* dst, const float* src, int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % 16 == 0 &&
      n % 4 == 0) {
    for (int i = int(threadIdx.x); i < n / 4; i += int(blockDim.x)) {
      const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst + 4 * i));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src + 4 * i));
    }
    return;
  }
#endif
  copy_rounds(dst, src, 0, n);
}

// Waits for this thread's stage_rows copies (a no-op for the plain copies).
__device__ inline void stage_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// dot[u] += sum over this lane's columns c = lane + 32 k < width of q[u][k] * row[c] (the
// latent part and the rope part of a score, each from its own tile).
template <int PerLane>
__device__ inline void add_lane_dots(float (&dot)[kHeadsPerWarp],
                                     const float (&q)[kHeadsPerWarp][PerLane], const float* row,
                                     int64_t width, int lane) {
#pragma unroll
  for (int k = 0; k < PerLane; ++k) {
    const int c = lane + 32 * k;
    if (c < width) {
      const float x = row[c];
#pragma unroll
      for (int u = 0; u < kHeadsPerWarp; ++u) dot[u] = fmaf(q[u][k], x, dot[u]);
    }
  }
}

// The block's token's position, checked: block (0, 0, 0) records the first bad entry of the
// op's positions check_positions[0, check_n) (kernels.h), before any block returns; an
// out-of-range position reads as the replacement row, so nothing outside the cache is touched.
__device__ inline int64_t checked_position(const IndexCheck& ic, const int32_t* check_positions,
                                           int64_t check_n, const int32_t* positions,
                                           int64_t token) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0)
    record_first_bad_index(ic, check_positions, check_n);
  return checked_index(ic, positions[token]);
}

__global__ void __launch_bounds__(kLatentWarps * 32)
    latent_partial_kernel(float* part_acc, float* part_ml, const float* q_lat, const float* q_rope,
                          const float* kv_latent, const float* k_rope, const int32_t* positions,
                          IndexCheck ic, const int32_t* check_positions, int64_t check_n,
                          int64_t heads, int64_t rank, int64_t rope, int64_t chunk, float scale) {
  // 16 x (512 + 64) floats = 36 KB: under the 48 KB of static shared memory.
  __shared__ __align__(16) float tile_lat[kLatentTile * kLatentMaxRank];
  __shared__ __align__(16) float tile_rope[kLatentTile * kLatentMaxRope];
  allow_dependents();
  wait_for_inputs();
  const int64_t split = blockIdx.x, splits = gridDim.x, token = blockIdx.z;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int64_t h0 = int64_t(blockIdx.y) * kLatentBlockHeads + warp * kHeadsPerWarp;
  const int64_t last =
      checked_position(ic, check_positions, check_n, positions, token);  // sees rows [0, last]
  const int64_t j0 = split * chunk, j1 = min(j0 + chunk, last + 1);
  float* ml = part_ml + (token * splits + split) * heads * 2;  // (m, l) per head
  float* acc_out = part_acc + (token * splits + split) * heads * rank;
  if (j0 > last) return;  // a split beyond the token's context: the merge never reads it

  // The first tile's copies go out before the queries are read, so both wait together.
  stage_rows(tile_lat, kv_latent + j0 * rank, int(min(int64_t(kLatentTile), j1 - j0) * rank));
  stage_rows(tile_rope, k_rope + j0 * rope, int(min(int64_t(kLatentTile), j1 - j0) * rope));
  float ql[kHeadsPerWarp][kRankPerLane], qr[kHeadsPerWarp][kRopePerLane];
  float acc[kHeadsPerWarp][kRankPerLane], m[kHeadsPerWarp], l[kHeadsPerWarp];
#pragma unroll
  for (int u = 0; u < kHeadsPerWarp; ++u) {
    const int64_t h = h0 + u;
    const bool valid = h < heads;  // a head past the last computes on zeros and is not written
#pragma unroll
    for (int k = 0; k < kRankPerLane; ++k) {
      const int c = lane + 32 * k;
      ql[u][k] = valid && c < rank ? q_lat[(token * heads + h) * rank + c] : 0.0f;
      acc[u][k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kRopePerLane; ++k) {
      const int c = lane + 32 * k;
      qr[u][k] = valid && c < rope ? q_rope[(token * heads + h) * rope + c] : 0.0f;
    }
    m[u] = -INFINITY;
    l[u] = 0.0f;
  }

  const bool busy = h0 < heads;  // warp-uniform; an idle warp still helps stage the tiles
  for (int64_t t0 = j0; t0 < j1; t0 += kLatentTile) {
    const int rows = int(min(int64_t(kLatentTile), j1 - t0));
    if (t0 != j0) {
      __syncthreads();  // every warp is done with the previous tile
      stage_rows(tile_lat, kv_latent + t0 * rank, rows * int(rank));
      stage_rows(tile_rope, k_rope + t0 * rope, rows * int(rope));
    }
    stage_wait();
    __syncthreads();
    if (!busy) continue;

    float s[kHeadsPerWarp];  // lane t: the score of the tile's row t (-inf on lanes past `rows`)
#pragma unroll
    for (int u = 0; u < kHeadsPerWarp; ++u) s[u] = -INFINITY;
#pragma unroll 4  // independent rows: their shuffle trees overlap
    for (int t = 0; t < rows; ++t) {
      float dot[kHeadsPerWarp];
#pragma unroll
      for (int u = 0; u < kHeadsPerWarp; ++u) dot[u] = 0.0f;
      add_lane_dots(dot, ql, tile_lat + t * int(rank), rank, lane);
      add_lane_dots(dot, qr, tile_rope + t * int(rope), rope, lane);
#pragma unroll
      for (int u = 0; u < kHeadsPerWarp; ++u) {
        const float v = warp_reduce(dot[u], Sum{}) * scale;  // the same bits on every lane
        if (lane == t) s[u] = v;
      }
    }

    float p[kHeadsPerWarp];  // lane t: exp(s_t - m_new), 0 past `rows`
#pragma unroll
    for (int u = 0; u < kHeadsPerWarp; ++u) {
      const float m_new = fmaxf(m[u], warp_reduce(s[u], Max{}));  // finite: rows >= 1
      const float corr = expf(m[u] - m_new);                      // 0 on the first tile
      p[u] = expf(s[u] - m_new);
      l[u] = l[u] * corr + warp_reduce(p[u], Sum{});
      m[u] = m_new;
#pragma unroll
      for (int k = 0; k < kRankPerLane; ++k) acc[u][k] *= corr;
    }
    for (int t = 0; t < rows; ++t) {
      float pt[kHeadsPerWarp];
#pragma unroll
      for (int u = 0; u < kHeadsPerWarp; ++u) pt[u] = __shfl_sync(0xffffffffu, p[u], t);
#pragma unroll
      for (int k = 0; k < kRankPerLane; ++k) {
        const int c = lane + 32 * k;
        if (c < rank) {
          const float x = tile_lat[t * int(rank) + c];
#pragma unroll
          for (int u = 0; u < kHeadsPerWarp; ++u) acc[u][k] = fmaf(pt[u], x, acc[u][k]);
        }
      }
    }
  }

  if (!busy) return;
#pragma unroll
  for (int u = 0; u < kHeadsPerWarp; ++u) {
    const int64_t h = h0 + u;
    if (h >= heads) continue;
#pragma unroll
    for (int k = 0; k < kRankPerLane; ++k) {
      const int c = lane + 32 * k;
      if (c < rank) acc_out[h * rank + c] = acc[u][k];
    }
    if (lane == 0) {
      ml[h * 2] = m[u];
      ml[h * 2 + 1] = l[u];
    }
  }
}

// One block per (token, head) row: the splits' partials merged in split order,
//   M = max_s m_s,  w_s = exp(m_s - M),  ctx = sum_s w_s acc_s / sum_s w_s l_s,
// over the splits that hold rows of the token's context: the first last / chunk + 1 of them
// (every one non-empty; the others were never written). Those count comes from the position
// in device memory like the partial kernel's, and the loops over it are unrolled so that the
// loads of several splits are in flight together.
__global__ void __launch_bounds__(kCombineThreads)
    latent_combine_kernel(float* ctx, const float* part_acc, const float* part_ml,
                          const int32_t* positions, IndexCheck ic, int64_t heads, int64_t rank,
                          int64_t splits, int64_t chunk) {
  __shared__ float weight[kLatentMaxSplits];  // w_s
  __shared__ float red[32];
  allow_dependents();
  wait_for_inputs();
  const int64_t row = blockIdx.x, token = row / heads, h = row % heads;
  const int64_t used = min(splits, int64_t(checked_index(ic, positions[token])) / chunk + 1);
  const float* ml = part_ml + (token * splits * heads + h) * 2;  // split s at + s * heads * 2
  float M = -INFINITY;
  for (int64_t s = threadIdx.x; s < used; s += blockDim.x) M = fmaxf(M, ml[s * heads * 2]);
  M = block_reduce(M, -INFINITY, red, Max{});
  float L = 0.0f;
  for (int64_t s = threadIdx.x; s < used; s += blockDim.x) {
    const float w = expf(ml[s * heads * 2] - M);
    weight[s] = w;
    L += w * ml[s * heads * 2 + 1];
  }
  L = block_reduce(L, 0.0f, red, Sum{});  // >= 1: the split holding M has w = 1 and l >= 1
  __syncthreads();                        // the weights are in shared memory
  const float inv = 1.0f / L;
  const float* acc =
      part_acc + (token * splits * heads + h) * rank;  // split s at + s * heads * rank
  for (int64_t c = threadIdx.x; c < rank; c += blockDim.x) {
    float a = 0.0f;
#pragma unroll 8
    for (int64_t s = 0; s < used; ++s) a = fmaf(weight[s], acc[s * heads * rank + c], a);
    ctx[row * rank + c] = a * inv;
  }
}

}  // namespace

cudaError_t latent_attention(float* ctx, float* part_acc, float* part_ml, const float* q_lat,
                             const float* q_rope, const float* kv_latent, const float* k_rope,
                             const int32_t* positions, const IndexCheck& ic,
                             const int32_t* check_positions, int64_t check_n,
                             const LatentShape& s) {
  if (s.tokens <= 0 || s.heads <= 0) return cudaSuccess;
  const int64_t chunk = latent_chunk(s.cap), splits = latent_splits(s.cap);
  const int64_t groups = (s.heads + kLatentBlockHeads - 1) / kLatentBlockHeads;
  if (s.cap <= 0 || s.rank <= 0 || s.rank > kLatentMaxRank || s.rope < 0 ||
      s.rope > kLatentMaxRope || s.tokens > kLatentMaxTokens || splits > kLatentMaxSplits ||
      groups > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid(unsigned(splits), unsigned(groups), unsigned(s.tokens));
  const cudaError_t e =
      launch_dependent(latent_partial_kernel, grid, dim3(kLatentWarps * 32), part_acc, part_ml,
                       q_lat, q_rope, kv_latent, k_rope, positions, ic, check_positions, check_n,
                       s.heads, s.rank, s.rope, chunk, s.scale);
  if (e != cudaSuccess) return e;
  return launch_dependent(latent_combine_kernel, dim3(unsigned(s.tokens * s.heads)),
                          dim3(kCombineThreads), ctx, part_acc, part_ml, positions, ic, s.heads,
                          s.rank, splits, chunk);
}

cudaError_t argmax(int32_t* idx, unsigned long long* best, unsigned* done, const float* x,
                   int64_t rows, int64_t cols, int64_t n) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  const int64_t per_block = int64_t(kArgmaxThreads) * kArgmaxPerThread;
  const dim3 grid(unsigned((n + per_block - 1) / per_block), unsigned(rows));
  if (rows > 65535) return cudaErrorInvalidValue;
  return launch_dependent(argmax_kernel, grid, dim3(kArgmaxThreads), idx, best, done, x, cols, n);
}

cudaError_t causal_softmax(float* x, int64_t rows, int64_t cols, int64_t group, int64_t offset) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  // Decode rows are short (the context so far): fewer threads idle on a short row.
  const int threads = cols >= 1024 ? 256 : (cols >= 256 ? 128 : 64);
  causal_softmax_kernel<<<unsigned(rows), threads, 0, stream()>>>(x, cols, group, offset);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
