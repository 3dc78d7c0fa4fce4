// CUDA kernels of MLA's batch-1 decode step around the latent attention (Backend::mla_cache_write,
// Backend::mla_absorb_query, Backend::mla_value_heads). A decode step's attention is a dozen tiny
// ops per layer whose launches cost more than their work (1-3 us each on an H200, 27 layers), so
// each of these does in one launch what took several: the cache write replaces two column copies,
// rope, RMSNorm and two set_rows; the query absorption replaces rope, a column copy and a batched
// GEMM (with its bf16 conversions); the value side replaces a batched GEMM. All read the positions
// from device memory (CUDA graphs replay them while the cache grows) and check them in their own
// kernel (index_check.cuh). Sums run in fixed orders: deterministic.
#include <cstdint>
#include <type_traits>

#include "ops/cuda/dependent_launch.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/index_check.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/warp_dots.cuh"

namespace moekit::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// The cache write and the prefill's kv_a split: one block per token. The row is short
// (r + dr = 576), so the kernel is pure latency; each thread loads its values of c_kv and of the
// norm weight into registers up front (one memory round trip for both, as the register RMSNorm of
// cuda_norm.cu) and rotates the rope pairs while the sum of squares is reduced.

constexpr int kWriteThreads = 128;
constexpr int kWritePerThread = 4;  // rank <= 512 in registers; longer rows go through a tail loop

// Token i's row of kv_a to its latent and rotated key. The cache write (Split = false) puts them
// in row positions[i] of the cache; the prefill split (Split = true, Backend::mla_kv_a_split) in
// row i, rotated at positions[i], with the norm's rstd[i] for its backward. L: the latent's
// element type (F32, or BF16 rounded once as written).
template <typename L, bool Split>
__global__ void __launch_bounds__(kWriteThreads)
    mla_kv_a_kernel(L* kv_latent, float* rstd_out, float* k_rope, const float* kv_a, const float* w,
                    float eps, const float* cos, const float* sin, const int32_t* positions,
                    IndexCheck pc, int64_t tokens, int64_t rank, int64_t rope) {
  __shared__ float red[32];
  allow_dependents();
  wait_for_inputs();
  if (blockIdx.x == 0) record_first_bad_index(pc, positions, tokens);  // uniform in the block
  const int64_t i = blockIdx.x, nt = blockDim.x;
  const int64_t pos = checked_index(pc, positions[i]);
  const int64_t row = Split ? i : pos;
  const float* x = kv_a + i * (rank + rope);  // [c_kv | k_rope] of token i

  float xv[kWritePerThread], wv[kWritePerThread];
#pragma unroll
  for (int k = 0; k < kWritePerThread; ++k) {
    const int64_t c = threadIdx.x + k * nt;
    xv[k] = c < rank ? x[c] : 0.0f;
    wv[k] = c < rank ? w[c] : 0.0f;
  }

  // k_rope: the pairs (2j, 2j+1) rotated by pos * freq_j, as Backend::rope (forward).
  const int64_t half = rope / 2;
  float* kr = k_rope + row * rope;
  for (int64_t j = threadIdx.x; j < half; j += nt) {
    const float a = x[rank + 2 * j], b = x[rank + 2 * j + 1];
    const float c = cos[pos * half + j], s = sin[pos * half + j];
    kr[2 * j] = a * c - b * s;
    kr[2 * j + 1] = b * c + a * s;
  }

  // kv_latent = kv_a_layernorm(c_kv), as rmsnorm_forward: out = w * (x * rstd).
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kWritePerThread; ++k) ss += xv[k] * xv[k];
  for (int64_t c = threadIdx.x + kWritePerThread * nt; c < rank; c += nt) ss += x[c] * x[c];
  ss = block_reduce(ss, 0.0f, red, Sum{});
  const float rstd = 1.0f / sqrtf(ss / float(rank) + eps);
  if (Split && threadIdx.x == 0) rstd_out[i] = rstd;
  L* lat = kv_latent + row * rank;
#pragma unroll
  for (int k = 0; k < kWritePerThread; ++k) {
    const int64_t c = threadIdx.x + k * nt;
    if (c < rank) lat[c] = from_f32<L>(wv[k] * (xv[k] * rstd));
  }
  for (int64_t c = threadIdx.x + kWritePerThread * nt; c < rank; c += nt)
    lat[c] = from_f32<L>(w[c] * (x[c] * rstd));
}

// ---------------------------------------------------------------------------------------------
// The query absorption, q_lat_h = W_kb_h^T q_nope_h: per head a [dn, r] block of the weight read
// once for up to kMlaAbsorbTokens tokens. Block (column tile, head, token group): lane l owns the
// V columns c0 = (tile * 32 + l) * V .. + V (one 16-byte load per weight row: V = 4 floats or 8
// bf16; V = 1 when the rows are not 16-byte aligned), and warp k of kAbsorbSlices sums the weight
// rows d = k, k + kAbsorbSlices, ... < dn, so a warp reads contiguous 512-byte row segments and the
// whole block keeps many loads in flight (all 16 of a thread at dn = 128, issued together, while
// q_nope goes to shared memory). The slices' partial sums
// are added in slice order through shared memory (no atomics). Column tile 0 of each head also
// rotates the head's q_pe into q_rope.

constexpr int kAbsorbSlices = 8;
constexpr int kAbsorbThreads = 32 * kAbsorbSlices;
constexpr int kTok = kMlaAbsorbTokens;
// Weight rows each thread has in flight at once: dn = 128 (DeepSeek-V2/V3) in one batch, so the
// kernel waits one memory latency for its weights. With 4 in flight (a plain unrolled loop that
// also read q from global memory per row) it took 11 us per decode step on an H200.
constexpr int kAbsorbUnroll = 16;
constexpr int64_t kAbsorbBatch = int64_t(kAbsorbSlices) * kAbsorbUnroll;

// One weight load of V columns: the 16 raw bytes of a chunk (widened when used), or one element.
template <typename W, int V>
using RawColumns = std::conditional_t<V == 1, W, uint4>;

template <typename W, int V>
__device__ inline RawColumns<W, V> load_raw(const W* p) {
  if constexpr (V == 1)
    return p[0];
  else
    return *reinterpret_cast<const uint4*>(p);
}

// The V columns of a raw load as fp32 (bf16 bits widened exactly; see warp_dots.cuh).
template <typename W, int V>
__device__ inline void widen(const RawColumns<W, V>& raw, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_f32(raw);
  } else {
    static_assert(V == Chunk<W>::n, "a vector load is one 16-byte chunk");
    Chunk<W>::widen(raw, out);
  }
}

template <typename W, int V>
__global__ void __launch_bounds__(kAbsorbThreads)
    mla_absorb_query_kernel(float* q_lat, float* q_rope, const float* q, const W* kv_b,
                            const float* cos, const float* sin, const int32_t* positions,
                            IndexCheck pc, int64_t tokens, int64_t heads, int64_t rank, int64_t dn,
                            int64_t dr, int64_t dv) {
  // Slices 1.. hand their sums to slice 0: [slice - 1][token][v][lane], lanes adjacent (no bank
  // conflicts). 7 * 4 * 8 * 32 floats = 28 KB at V = 8; q_nope of the group's tokens 4 KB.
  __shared__ float part[kAbsorbSlices - 1][kTok][V][32];
  __shared__ float q_nope[kTok][kMlaAbsorbMaxDn];
  allow_dependents();
  wait_for_inputs();
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0)  // uniform in the block
    record_first_bad_index(pc, positions, tokens);
  const int lane = int(threadIdx.x) & 31, slice = int(threadIdx.x) >> 5;
  const int64_t h = blockIdx.y, dqk = dn + dr, ldq = heads * dqk, half = dr / 2;
  const int64_t c0 = (int64_t(blockIdx.x) * 32 + lane) * V;  // this lane's first column
  const bool has_cols = c0 < rank;             // V divides rank when V > 1 (the launch checks)
  const W* wkb = kv_b + h * (dn + dv) * rank;  // W_kb_h: the head's first dn rows
  const int64_t batches = (dn + kAbsorbBatch - 1) / kAbsorbBatch;  // uniform in the block

  for (int64_t t0 = int64_t(blockIdx.z) * kTok; t0 < tokens; t0 += int64_t(gridDim.z) * kTok) {
    const int nt = int(min(int64_t(kTok), tokens - t0));
    if (blockIdx.x == 0) {  // q_rope of head h for this group's tokens (reads q only)
      for (int64_t e = threadIdx.x; e < nt * half; e += blockDim.x) {
        const int64_t t = t0 + e / half, j = e % half;
        const int64_t pos = checked_index(pc, positions[t]);
        const float* p = q + t * ldq + h * dqk + dn + 2 * j;
        const float a = p[0], b = p[1], c = cos[pos * half + j], s = sin[pos * half + j];
        float* out = q_rope + (t * heads + h) * dr + 2 * j;
        out[0] = a * c - b * s;
        out[1] = b * c + a * s;
      }
    }

    float acc[kTok][V];
#pragma unroll
    for (int u = 0; u < kTok; ++u)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[u][v] = 0.0f;
    for (int64_t b = 0; b < batches; ++b) {
      // This thread's weight rows d = b * kAbsorbBatch + i * kAbsorbSlices + slice: every load
      // issued before any is used.
      RawColumns<W, V> raw[kAbsorbUnroll];
#pragma unroll
      for (int i = 0; i < kAbsorbUnroll; ++i) {
        const int64_t d = b * kAbsorbBatch + i * kAbsorbSlices + slice;
        if (has_cols && d < dn) raw[i] = load_raw<W, V>(wkb + d * rank + c0);
      }
      if (b == 0) {  // q_nope of the group's tokens to shared memory, while the weights arrive
        for (int64_t e = threadIdx.x; e < nt * dn; e += blockDim.x)
          q_nope[e / dn][e % dn] = q[(t0 + e / dn) * ldq + h * dqk + e % dn];
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < kAbsorbUnroll; ++i) {
        const int64_t d = b * kAbsorbBatch + i * kAbsorbSlices + slice;
        if (!has_cols || d >= dn) continue;
        float wv[V];
        widen<W, V>(raw[i], wv);
#pragma unroll
        for (int u = 0; u < kTok; ++u) {
          if (u >= nt) continue;
          const float qd = q_nope[u][d];  // the same address in every lane: one broadcast
#pragma unroll
          for (int v = 0; v < V; ++v) acc[u][v] = fmaf(qd, wv[v], acc[u][v]);
        }
      }
    }
    if (slice > 0) {
#pragma unroll
      for (int u = 0; u < kTok; ++u)
#pragma unroll
        for (int v = 0; v < V; ++v) part[slice - 1][u][v][lane] = acc[u][v];
    }
    __syncthreads();
    if (slice == 0 && has_cols) {
#pragma unroll
      for (int u = 0; u < kTok; ++u) {
        if (u >= nt) continue;
        float* out = q_lat + ((t0 + u) * heads + h) * rank + c0;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          float s = acc[u][v];
#pragma unroll
          for (int k = 0; k < kAbsorbSlices - 1; ++k) s += part[k][u][v][lane];
          out[v] = s;
        }
      }
    }
    __syncthreads();  // `part` and `q_nope` are written again by the next token group
  }
}

template <typename W, int V>
cudaError_t launch_absorb(float* q_lat, float* q_rope, const float* q, const W* kv_b,
                          const float* cos, const float* sin, const int32_t* positions,
                          const IndexCheck& pc, const MlaStepShape& s) {
  const int64_t cols_per_block = 32 * V;
  const int64_t tiles = (s.rank + cols_per_block - 1) / cols_per_block;
  const int64_t groups = (s.tokens + kTok - 1) / kTok;
  // At least one tile: with rank 0 the rope part still runs. Token groups beyond 65535 are taken
  // by the kernel's loop.
  const dim3 grid(unsigned(tiles > 0 ? tiles : 1), unsigned(s.heads),
                  unsigned(groups < 65535 ? groups : 65535));
  return launch_dependent(mla_absorb_query_kernel<W, V>, grid, dim3(kAbsorbThreads), q_lat, q_rope,
                          q, kv_b, cos, sin, positions, pc, s.tokens, s.heads, s.rank, s.dn, s.dr,
                          s.dv);
}

// ---------------------------------------------------------------------------------------------
// The value side, o_h = W_vb_h ctx_h: one warp per weight row (h, j), read once with 16-byte
// loads (warp_dots.cuh) against the context rows of up to R tokens at a time. R = 1 for a decode
// step (no registers kept for rows it does not have, as cuda_gemv.cu).

constexpr int kValueThreads = 256;

template <typename W, int R>
__global__ void __launch_bounds__(kValueThreads)
    mla_value_heads_kernel(float* o, const float* ctx, const W* kv_b, int64_t tokens, int64_t heads,
                           int64_t rank, int64_t dn, int64_t dv) {
  allow_dependents();
  wait_for_inputs();
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= heads * dv) return;  // whole warps: row is the same in every lane
  const int64_t h = row / dv, j = row % dv;
  const W* w = kv_b + (h * (dn + dv) + dn + j) * rank;  // row j of W_vb_h
  for (int64_t t0 = 0; t0 < tokens; t0 += R) {
    const int nr = int(min(int64_t(R), tokens - t0));
    const W* wr[R];
    const float* ar[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      wr[r] = w;
      ar[r] = ctx + ((t0 + (r < nr ? r : 0)) * heads + h) * rank;
    }
    float acc[R];
    warp_dots<W, R>(acc, wr, ar, nr, rank);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < nr) o[(t0 + r) * heads * dv + h * dv + j] = acc[r];
    }
  }
}

template <typename W>
cudaError_t launch_value(float* o, const float* ctx, const W* kv_b, const MlaStepShape& s) {
  const int64_t warps = s.heads * s.dv, per_block = kValueThreads / 32;
  const unsigned blocks = unsigned((warps + per_block - 1) / per_block);
  return launch_dependent(
      s.tokens == 1 ? mla_value_heads_kernel<W, 1> : mla_value_heads_kernel<W, 4>, dim3(blocks),
      dim3(kValueThreads), o, ctx, kv_b, s.tokens, s.heads, s.rank, s.dn, s.dv);
}

}  // namespace

cudaError_t mla_cache_write(float* kv_latent, float* k_rope, const float* kv_a, const float* norm_w,
                            float eps, const float* cos, const float* sin, const int32_t* positions,
                            const IndexCheck& positions_check, const MlaStepShape& s) {
  if (s.tokens <= 0) return cudaSuccess;
  if (s.tokens > 0x7fffffff) return cudaErrorInvalidValue;  // grid.x
  return launch_dependent(mla_kv_a_kernel<float, false>, dim3(unsigned(s.tokens)),
                          dim3(kWriteThreads), kv_latent, static_cast<float*>(nullptr), k_rope,
                          kv_a, norm_w, eps, cos, sin, positions, positions_check, s.tokens, s.rank,
                          s.dr);
}

cudaError_t mla_kv_a_split(void* kv_latent, bool latent_bf16, float* rstd, float* k_rope,
                           const float* kv_a, const float* norm_w, float eps, const float* cos,
                           const float* sin, const int32_t* positions,
                           const IndexCheck& positions_check, const MlaStepShape& s) {
  if (s.tokens <= 0) return cudaSuccess;
  if (s.tokens > 0x7fffffff) return cudaErrorInvalidValue;  // grid.x
  if (latent_bf16)
    return launch_dependent(mla_kv_a_kernel<bf16_t, true>, dim3(unsigned(s.tokens)),
                            dim3(kWriteThreads), static_cast<bf16_t*>(kv_latent), rstd, k_rope,
                            kv_a, norm_w, eps, cos, sin, positions, positions_check, s.tokens,
                            s.rank, s.dr);
  return launch_dependent(mla_kv_a_kernel<float, true>, dim3(unsigned(s.tokens)),
                          dim3(kWriteThreads), static_cast<float*>(kv_latent), rstd, k_rope, kv_a,
                          norm_w, eps, cos, sin, positions, positions_check, s.tokens, s.rank,
                          s.dr);
}

cudaError_t mla_absorb_query(float* q_lat, float* q_rope, const float* q, const void* kv_b,
                             bool kv_b_bf16, const float* cos, const float* sin,
                             const int32_t* positions, const IndexCheck& positions_check,
                             const MlaStepShape& s) {
  if (s.tokens <= 0 || s.heads <= 0) return cudaSuccess;
  if (s.heads > 65535 || s.dn > kMlaAbsorbMaxDn) return cudaErrorInvalidValue;  // grid.y, smem
  // 16-byte loads when every weight row starts 16-byte aligned: the base is, and a row is a
  // whole number of chunks.
  const bool aligned = reinterpret_cast<uintptr_t>(kv_b) % 16 == 0;
  if (kv_b_bf16) {
    const auto* w = static_cast<const uint16_t*>(kv_b);
    if (aligned && s.rank % 8 == 0)
      return launch_absorb<uint16_t, 8>(q_lat, q_rope, q, w, cos, sin, positions, positions_check,
                                        s);
    return launch_absorb<uint16_t, 1>(q_lat, q_rope, q, w, cos, sin, positions, positions_check, s);
  }
  const auto* w = static_cast<const float*>(kv_b);
  if (aligned && s.rank % 4 == 0)
    return launch_absorb<float, 4>(q_lat, q_rope, q, w, cos, sin, positions, positions_check, s);
  return launch_absorb<float, 1>(q_lat, q_rope, q, w, cos, sin, positions, positions_check, s);
}

cudaError_t mla_value_heads(float* o, const float* ctx, const void* kv_b, bool kv_b_bf16,
                            const MlaStepShape& s) {
  if (s.tokens <= 0 || s.heads <= 0 || s.dv <= 0) return cudaSuccess;
  if (kv_b_bf16) return launch_value(o, ctx, static_cast<const uint16_t*>(kv_b), s);
  return launch_value(o, ctx, static_cast<const float*>(kv_b), s);
}

}  // namespace moekit::cuda
