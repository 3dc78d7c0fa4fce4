// CUDA kernels, part 5: causal attention, flash-style (FlashAttention-2's loop order) in fp32.
// Why hand-written: the MLA head dims (q/k 192 = 128 nope + 64 rope, v 128) differ between q/k
// and v, moekit's layout is [tokens, heads, dim] rows, and the [S, S] score matrix should never
// reach device memory. Each block owns a tile of B query rows (forward, dQ) or B key rows (dK/dV)
// of one (sequence, head), streams the other side through shared-memory tiles, and keeps the
// softmax online (running max and sum), so memory traffic is O(S * d) per head, not O(S^2).
// Backward recomputes P from the saved log-sum-exp; dQ and dK/dV are separate kernels so no two
// blocks ever add into the same output (deterministic, no atomics).
// Not yet tuned: the tile products are scalar fp32 FMAs from shared memory (no tensor cores, no
// async copies); fp32 tensor-core paths would cost the CPU-matching 1e-5 accuracy anyway.
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

constexpr int kAttnThreads = 256;

// Tile geometry in shared memory: rows padded by one float so that column walks across a warp
// hit 32 different banks.
struct Tiles {
  int dqk, dv;
  __host__ __device__ int qk_ld() const { return dqk + 1; }
  __host__ __device__ int v_ld() const { return dv + 1; }
};

// Loads rows [row0, row0 + B) of one head from a [tokens, heads, d] tensor into smem
// (ld = d + 1); rows past the sequence become zeros.
template <int B>
__device__ void load_tile(float* dst, const float* src, int64_t base_token, int row0, int seq,
                          int heads, int d) {
  for (int e = threadIdx.x; e < B * d; e += blockDim.x) {
    const int r = e / d, c = e % d, i = row0 + r;
    dst[r * (d + 1) + c] = i < seq ? src[((base_token + i) * heads) * int64_t(d) + c] : 0.0f;
  }
}

template <int B>
__device__ void store_tile(float* dst, const float* src, int64_t base_token, int row0, int seq,
                           int heads, int d) {
  for (int e = threadIdx.x; e < B * d; e += blockDim.x) {
    const int r = e / d, c = e % d, i = row0 + r;
    if (i < seq) dst[((base_token + i) * heads) * int64_t(d) + c] = src[r * (d + 1) + c];
  }
}

__device__ inline float dot_rows(const float* a, const float* b, int d) {
  float s = 0.0f;
  for (int c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

template <int B>
size_t forward_smem(const Tiles& t) {
  // Q, K [B, dqk+1]; V, O [B, dv+1]; S [B, B+1]; m, l, alpha [B].
  return sizeof(float) * size_t(2 * B * t.qk_ld() + 2 * B * t.v_ld() + B * (B + 1) + 3 * B);
}

template <int B>
__global__ void __launch_bounds__(kAttnThreads)
    attention_forward_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                             AttentionShape s, Tiles t) {
  extern __shared__ float smem[];
  const int seq = int(s.seq), heads = int(s.heads), h = blockIdx.y, b = blockIdx.z;
  const int i0 = blockIdx.x * B;
  float* Qs = smem;
  float* Ks = Qs + B * t.qk_ld();
  float* Vs = Ks + B * t.qk_ld();
  float* Os = Vs + B * t.v_ld();
  float* Ss = Os + B * t.v_ld();
  float* m = Ss + B * (B + 1);
  float* l = m + B;
  float* alpha = l + B;
  // Head h of token (b*seq + i) starts at ((b*seq + i) * heads + h) * d: offset the bases by h.
  const int64_t base = int64_t(b) * seq;
  const float* qh = q + int64_t(h) * t.dqk;
  const float* kh = k + int64_t(h) * t.dqk;
  const float* vh = v + int64_t(h) * t.dv;

  load_tile<B>(Qs, qh, base, i0, seq, heads, t.dqk);
  for (int e = threadIdx.x; e < B * t.dv; e += blockDim.x) Os[(e / t.dv) * t.v_ld() + e % t.dv] = 0;
  for (int r = threadIdx.x; r < B; r += blockDim.x) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int j0 = 0; j0 <= i0 && j0 < seq; j0 += B) {  // causal: key tiles up to the diagonal
    load_tile<B>(Ks, kh, base, j0, seq, heads, t.dqk);
    load_tile<B>(Vs, vh, base, j0, seq, heads, t.dv);
    __syncthreads();
    for (int e = threadIdx.x; e < B * B; e += blockDim.x) {
      const int r = e / B, c = e % B, i = i0 + r, j = j0 + c;
      Ss[r * (B + 1) + c] = (j <= i && j < seq && i < seq)
                                ? s.scale * dot_rows(Qs + r * t.qk_ld(), Ks + c * t.qk_ld(), t.dqk)
                                : -INFINITY;
    }
    __syncthreads();
    // Online softmax, one warp per row: new max, rescale factor, probabilities.
    for (int r = warp; r < B; r += warps) {
      float* row = Ss + r * (B + 1);
      float mx = -INFINITY;
      for (int c = lane; c < B; c += 32) mx = fmaxf(mx, row[c]);
      mx = warp_reduce(mx, Max{});
      const float m_new = fmaxf(m[r], mx);
      float sum = 0.0f;
      for (int c = lane; c < B; c += 32) {
        const float p = m_new == -INFINITY ? 0.0f : expf(row[c] - m_new);
        row[c] = p;
        sum += p;
      }
      sum = warp_reduce(sum, Sum{});
      if (lane == 0) {
        const float a = m[r] == -INFINITY ? (m_new == -INFINITY ? 1.0f : 0.0f) : expf(m[r] - m_new);
        alpha[r] = a;
        l[r] = a * l[r] + sum;
        m[r] = m_new;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < B * t.dv; e += blockDim.x) {
      const int r = e / t.dv, d = e % t.dv;
      const float* p = Ss + r * (B + 1);
      float acc = Os[r * t.v_ld() + d] * alpha[r];
      for (int c = 0; c < B; ++c) acc += p[c] * Vs[c * t.v_ld() + d];
      Os[r * t.v_ld() + d] = acc;
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < B * t.dv; e += blockDim.x) {
    const int r = e / t.dv;
    Os[r * t.v_ld() + e % t.dv] /= l[r];
  }
  for (int r = threadIdx.x; r < B; r += blockDim.x)
    if (i0 + r < seq) lse[(int64_t(b) * heads + h) * seq + i0 + r] = m[r] + logf(l[r]);
  __syncthreads();
  store_tile<B>(out + int64_t(h) * t.dv, Os, base, i0, seq, heads, t.dv);
}

// delta[b, h, i] = dot(dO[i], O[i]) = rowsum(P * dP): the softmax-backward correction term. O
// fp32, or bf16 (the output a bf16 attention stored rounded), widened exactly.
template <typename OT>
__global__ void attention_delta_kernel(float* delta, const float* dout, const OT* out,
                                       AttentionShape s) {
  const int64_t rowh = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;  // (token, head)
  const int lane = threadIdx.x & 31;
  if (rowh >= s.batch * s.seq * s.heads) return;
  const int64_t dv = s.dv;
  float acc = 0.0f;
  for (int64_t c = lane; c < dv; c += 32) acc += dout[rowh * dv + c] * to_f32(out[rowh * dv + c]);
  acc = warp_reduce(acc, Sum{});
  const int64_t h = rowh % s.heads, token = rowh / s.heads, b = token / s.seq, i = token % s.seq;
  if (lane == 0) delta[(b * s.heads + h) * s.seq + i] = acc;
}

// dS[r, c] = P[r, c] * (dP[r, c] - delta[r]) * scale with P = exp(scale q.k - lse) (causal),
// dP = dO . v; the shared step of both backward kernels. Also writes P when Ps is given.
template <int B>
__device__ void backward_scores(float* Ps, float* dSs, const float* Qs, const float* dOs,
                                const float* Ks, const float* Vs, const float* lse_s,
                                const float* delta_s, int i0, int j0, int seq, float scale,
                                const Tiles& t) {
  for (int e = threadIdx.x; e < B * B; e += blockDim.x) {
    const int r = e / B, c = e % B, i = i0 + r, j = j0 + c;
    float p = 0.0f, ds = 0.0f;
    if (j <= i && i < seq && j < seq) {
      p = expf(scale * dot_rows(Qs + r * t.qk_ld(), Ks + c * t.qk_ld(), t.dqk) - lse_s[r]);
      const float dp = dot_rows(dOs + r * t.v_ld(), Vs + c * t.v_ld(), t.dv);
      ds = p * (dp - delta_s[r]) * scale;
    }
    if (Ps) Ps[r * (B + 1) + c] = p;
    dSs[r * (B + 1) + c] = ds;
  }
}

template <int B>
__device__ void load_row_stats(float* lse_s, float* delta_s, const float* lse, const float* delta,
                               int64_t bh, int i0, int seq) {
  for (int r = threadIdx.x; r < B; r += blockDim.x) {
    const int i = i0 + r;
    lse_s[r] = i < seq ? lse[bh * seq + i] : 0.0f;
    delta_s[r] = i < seq ? delta[bh * seq + i] : 0.0f;
  }
}

template <int B>
size_t dkdv_smem(const Tiles& t) {
  // K, dK, Q [B, dqk+1]; V, dV, dO [B, dv+1]; P, dS [B, B+1]; lse, delta [B].
  return sizeof(float) * size_t(3 * B * t.qk_ld() + 3 * B * t.v_ld() + 2 * B * (B + 1) + 2 * B);
}

// One block per key tile: dV = sum_i P^T dO, dK = sum_i dS^T Q over the query tiles at or below
// the diagonal.
template <int B>
__global__ void __launch_bounds__(kAttnThreads)
    attention_dkdv_kernel(float* dk, float* dv, const float* dout, const float* lse,
                          const float* delta, const float* q, const float* k, const float* v,
                          AttentionShape s, Tiles t) {
  extern __shared__ float smem[];
  const int seq = int(s.seq), heads = int(s.heads), h = blockIdx.y, b = blockIdx.z;
  const int j0 = blockIdx.x * B;
  float* Ks = smem;
  float* dKs = Ks + B * t.qk_ld();
  float* Qs = dKs + B * t.qk_ld();
  float* Vs = Qs + B * t.qk_ld();
  float* dVs = Vs + B * t.v_ld();
  float* dOs = dVs + B * t.v_ld();
  float* Ps = dOs + B * t.v_ld();
  float* dSs = Ps + B * (B + 1);
  float* lse_s = dSs + B * (B + 1);
  float* delta_s = lse_s + B;
  const int64_t base = int64_t(b) * seq, bh = int64_t(b) * heads + h;
  load_tile<B>(Ks, k + int64_t(h) * t.dqk, base, j0, seq, heads, t.dqk);
  load_tile<B>(Vs, v + int64_t(h) * t.dv, base, j0, seq, heads, t.dv);
  for (int e = threadIdx.x; e < B * t.dqk; e += blockDim.x)
    dKs[(e / t.dqk) * t.qk_ld() + e % t.dqk] = 0;
  for (int e = threadIdx.x; e < B * t.dv; e += blockDim.x)
    dVs[(e / t.dv) * t.v_ld() + e % t.dv] = 0;
  for (int i0 = j0; i0 < seq; i0 += B) {
    load_tile<B>(Qs, q + int64_t(h) * t.dqk, base, i0, seq, heads, t.dqk);
    load_tile<B>(dOs, dout + int64_t(h) * t.dv, base, i0, seq, heads, t.dv);
    load_row_stats<B>(lse_s, delta_s, lse, delta, bh, i0, seq);
    __syncthreads();
    backward_scores<B>(Ps, dSs, Qs, dOs, Ks, Vs, lse_s, delta_s, i0, j0, seq, s.scale, t);
    __syncthreads();
    for (int e = threadIdx.x; e < B * t.dv; e += blockDim.x) {
      const int c = e / t.dv, d = e % t.dv;
      float acc = dVs[c * t.v_ld() + d];
      for (int r = 0; r < B; ++r) acc += Ps[r * (B + 1) + c] * dOs[r * t.v_ld() + d];
      dVs[c * t.v_ld() + d] = acc;
    }
    for (int e = threadIdx.x; e < B * t.dqk; e += blockDim.x) {
      const int c = e / t.dqk, d = e % t.dqk;
      float acc = dKs[c * t.qk_ld() + d];
      for (int r = 0; r < B; ++r) acc += dSs[r * (B + 1) + c] * Qs[r * t.qk_ld() + d];
      dKs[c * t.qk_ld() + d] = acc;
    }
    __syncthreads();
  }
  store_tile<B>(dk + int64_t(h) * t.dqk, dKs, base, j0, seq, heads, t.dqk);
  store_tile<B>(dv + int64_t(h) * t.dv, dVs, base, j0, seq, heads, t.dv);
}

template <int B>
size_t dq_smem(const Tiles& t) {
  // Q, dQ, K [B, dqk+1]; dO, V [B, dv+1]; dS [B, B+1]; lse, delta [B].
  return sizeof(float) * size_t(3 * B * t.qk_ld() + 2 * B * t.v_ld() + B * (B + 1) + 2 * B);
}

// One block per query tile: dQ = sum_j dS K over the key tiles up to the diagonal.
template <int B>
__global__ void __launch_bounds__(kAttnThreads)
    attention_dq_kernel(float* dq, const float* dout, const float* lse, const float* delta,
                        const float* q, const float* k, const float* v, AttentionShape s, Tiles t) {
  extern __shared__ float smem[];
  const int seq = int(s.seq), heads = int(s.heads), h = blockIdx.y, b = blockIdx.z;
  const int i0 = blockIdx.x * B;
  float* Qs = smem;
  float* dQs = Qs + B * t.qk_ld();
  float* Ks = dQs + B * t.qk_ld();
  float* dOs = Ks + B * t.qk_ld();
  float* Vs = dOs + B * t.v_ld();
  float* dSs = Vs + B * t.v_ld();
  float* lse_s = dSs + B * (B + 1);
  float* delta_s = lse_s + B;
  const int64_t base = int64_t(b) * seq, bh = int64_t(b) * heads + h;
  load_tile<B>(Qs, q + int64_t(h) * t.dqk, base, i0, seq, heads, t.dqk);
  load_tile<B>(dOs, dout + int64_t(h) * t.dv, base, i0, seq, heads, t.dv);
  load_row_stats<B>(lse_s, delta_s, lse, delta, bh, i0, seq);
  for (int e = threadIdx.x; e < B * t.dqk; e += blockDim.x)
    dQs[(e / t.dqk) * t.qk_ld() + e % t.dqk] = 0;
  for (int j0 = 0; j0 <= i0 && j0 < seq; j0 += B) {
    load_tile<B>(Ks, k + int64_t(h) * t.dqk, base, j0, seq, heads, t.dqk);
    load_tile<B>(Vs, v + int64_t(h) * t.dv, base, j0, seq, heads, t.dv);
    __syncthreads();
    backward_scores<B>(nullptr, dSs, Qs, dOs, Ks, Vs, lse_s, delta_s, i0, j0, seq, s.scale, t);
    __syncthreads();
    for (int e = threadIdx.x; e < B * t.dqk; e += blockDim.x) {
      const int r = e / t.dqk, d = e % t.dqk;
      float acc = dQs[r * t.qk_ld() + d];
      for (int c = 0; c < B; ++c) acc += dSs[r * (B + 1) + c] * Ks[c * t.qk_ld() + d];
      dQs[r * t.qk_ld() + d] = acc;
    }
    __syncthreads();
  }
  store_tile<B>(dq + int64_t(h) * t.dqk, dQs, base, i0, seq, heads, t.dqk);
}

// Launches kernel<B> with `smem` dynamic shared memory, raising the block's limit past 48 KB
// when needed; cudaErrorInvalidValue when even the opt-in limit is too small.
template <typename Kernel>
cudaError_t launch(Kernel kernel, size_t smem, dim3 grid, const void* const* args) {
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  if (smem > size_t(optin)) return cudaErrorInvalidValue;
  e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(kAttnThreads),
                          const_cast<void**>(args), smem, stream());
}

int shared_limit() {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 48 * 1024;
  return optin;
}

dim3 grid_for(const AttentionShape& s, int B) {
  return dim3(unsigned((s.seq + B - 1) / B), unsigned(s.heads), unsigned(s.batch));
}

template <int B>
cudaError_t forward_with(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionShape& s, const Tiles& t) {
  const void* args[] = {&out, &lse, &q, &k, &v, &s, &t};
  return launch(attention_forward_kernel<B>, forward_smem<B>(t), grid_for(s, B), args);
}

template <int B>
cudaError_t backward_with(float* dq, float* dk, float* dv, const float* delta, const float* dout,
                          const float* lse, const float* q, const float* k, const float* v,
                          const AttentionShape& s, const Tiles& t) {
  const void* a1[] = {&dk, &dv, &dout, &lse, &delta, &q, &k, &v, &s, &t};
  cudaError_t e = launch(attention_dkdv_kernel<B>, dkdv_smem<B>(t), grid_for(s, B), a1);
  if (e != cudaSuccess) return e;
  const void* a2[] = {&dq, &dout, &lse, &delta, &q, &k, &v, &s, &t};
  return launch(attention_dq_kernel<B>, dq_smem<B>(t), grid_for(s, B), a2);
}

}  // namespace

cudaError_t attention_delta(float* delta, const float* dout, const void* out, bool out_bf16,
                            const AttentionShape& s) {
  const int64_t rows = s.batch * s.seq * s.heads;
  if (rows == 0) return cudaSuccess;
  if (out_bf16)
    attention_delta_kernel<<<blocks_for(rows * 32), kThreads, 0, stream()>>>(
        delta, dout, static_cast<const bf16_t*>(out), s);
  else
    attention_delta_kernel<<<blocks_for(rows * 32), kThreads, 0, stream()>>>(
        delta, dout, static_cast<const float*>(out), s);
  return cudaGetLastError();
}

// Tile size: 32 rows when the head dims fit shared memory (every MLA shape does), else 16.
cudaError_t attention_forward(float* out, float* lse, const float* q, const float* k,
                              const float* v, const AttentionShape& s) {
  if (s.batch * s.seq * s.heads == 0) return cudaSuccess;
  const Tiles t{int(s.dqk), int(s.dv)};
  if (forward_smem<32>(t) <= size_t(shared_limit()))
    return forward_with<32>(out, lse, q, k, v, s, t);
  return forward_with<16>(out, lse, q, k, v, s, t);
}

cudaError_t attention_backward(float* dq, float* dk, float* dv, float* delta, const float* dout,
                               const float* out, const float* lse, const float* q, const float* k,
                               const float* v, const AttentionShape& s) {
  if (s.batch * s.seq * s.heads == 0) return cudaSuccess;
  cudaError_t e = attention_delta(delta, dout, out, false, s);
  if (e != cudaSuccess) return e;
  const Tiles t{int(s.dqk), int(s.dv)};
  if (dkdv_smem<32>(t) <= size_t(shared_limit()))
    return backward_with<32>(dq, dk, dv, delta, dout, lse, q, k, v, s, t);
  return backward_with<16>(dq, dk, dv, delta, dout, lse, q, k, v, s, t);
}

}  // namespace moekit::cuda
