// CUDA kernels, part 5b: the two row passes of causal attention on the bf16 tensor cores
// (host side and the GEMMs around them: cuda_attention_tc.cpp). The GEMMs write fp32 score
// blocks; these kernels turn them into the bf16 operands of the next GEMMs, in fp32 arithmetic
// with one rounding at the end (the softmax needs fp32 scores: a bf16 score of magnitude ~10 is
// off by up to 0.03, which exp() turns into a 3% error in P).
// One block per (query row, head): the row is at most a few thousand floats, read from L2 by the
// passes after the first, and its reductions are fixed shuffle trees (deterministic).
#include <cuda_bf16.h>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

// Block (r, h): query i = i0 + r of head h; the row holds keys [0, keys), keys = i0 + rows, of
// which j <= i are visible.
__global__ void attention_tc_softmax_kernel(__nv_bfloat16* p, float* lse, const float* s,
                                            int64_t rows, int64_t i0, int64_t seq) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x, h = blockIdx.y, i = i0 + r, keys = i0 + rows;
  const int64_t at = (h * rows + r) * keys;
  const float* row = s + at;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, row[j]);
  m = block_reduce(m, -INFINITY, shared, Max{});
  float z = 0.0f;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) z += expf(row[j] - m);
  z = block_reduce(z, 0.0f, shared, Sum{});
  const float l = m + logf(z);
  for (int64_t j = threadIdx.x; j < keys; j += blockDim.x)
    p[at + j] = __float2bfloat16_rn(j <= i ? expf(row[j] - l) : 0.0f);
  if (threadIdx.x == 0) lse[h * seq + i] = l;
}

// dS = P * (dP - delta) * scale: the softmax backward with the score scale folded in, so that
// dQ = dS K and dK = dS^T Q hold for the unscaled q.k. P is recomputed from the saved lse.
__global__ void attention_tc_dscores_kernel(__nv_bfloat16* p, __nv_bfloat16* ds, const float* s,
                                            const float* dp, const float* lse, const float* delta,
                                            int64_t rows, int64_t i0, int64_t seq, float scale) {
  const int64_t r = blockIdx.x, h = blockIdx.y, i = i0 + r, keys = i0 + rows;
  const int64_t at = (h * rows + r) * keys;
  const float l = lse[h * seq + i], d = delta[h * seq + i];
  for (int64_t j = threadIdx.x; j < keys; j += blockDim.x) {
    float pj = 0.0f, dsj = 0.0f;
    if (j <= i) {
      pj = expf(s[at + j] - l);
      dsj = pj * (dp[at + j] - d) * scale;
    }
    p[at + j] = __float2bfloat16_rn(pj);
    ds[at + j] = __float2bfloat16_rn(dsj);
  }
}

dim3 row_grid(int64_t heads, int64_t rows) {
  return dim3(unsigned(rows), unsigned(heads));
}

}  // namespace

cudaError_t attention_tc_softmax(void* p, float* lse, const float* s, int64_t heads, int64_t rows,
                                 int64_t i0, int64_t seq) {
  if (heads * rows == 0) return cudaSuccess;
  if (heads > 65535) return cudaErrorInvalidValue;
  attention_tc_softmax_kernel<<<row_grid(heads, rows), kThreads, 0, stream()>>>(
      static_cast<__nv_bfloat16*>(p), lse, s, rows, i0, seq);
  return cudaGetLastError();
}

cudaError_t attention_tc_dscores(void* p, void* ds, const float* s, const float* dp,
                                 const float* lse, const float* delta, int64_t heads, int64_t rows,
                                 int64_t i0, int64_t seq, float scale) {
  if (heads * rows == 0) return cudaSuccess;
  if (heads > 65535) return cudaErrorInvalidValue;
  attention_tc_dscores_kernel<<<row_grid(heads, rows), kThreads, 0, stream()>>>(
      static_cast<__nv_bfloat16*>(p), static_cast<__nv_bfloat16*>(ds), s, dp, lse, delta, rows, i0,
      seq, scale);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
