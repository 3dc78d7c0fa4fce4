// CUDA kernels, part 5: the optimizer. AdamW updates one parameter and its two moments in one
// elementwise pass; the sum of squares (gradient clipping's global norm) reduces in double with a
// grid fixed by the size and fixed shuffle trees, then sums the block partials in order in one
// block, so the result has the same bits on every run.
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

constexpr unsigned kMaxSumBlocks = 1024;

__global__ void sum_squares_partial_kernel(double* partial, const float* x, int64_t n) {
  __shared__ double red[32];
  double s = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    s += double(x[i]) * double(x[i]);
  s = block_reduce(s, 0.0, red, Sum{});
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sum_partials_kernel(double* out, const double* partial, int64_t n) {
  __shared__ double red[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  s = block_reduce(s, 0.0, red, Sum{});
  if (threadIdx.x == 0) *out = s;
}

}  // namespace

namespace {

// One element's update (w, m, v in place), the same expression on both paths of adamw_step.
__device__ inline void adamw_update(float& w, float& m, float& v, float g, const AdamWStep& s) {
  m = s.beta1 * m + (1.0f - s.beta1) * g;
  v = s.beta2 * v + (1.0f - s.beta2) * g * g;
  w -= s.decay * w;  // decoupled decay
  w -= s.step_size * m / (sqrtf(v * s.inv_bc2) + s.eps);
}

}  // namespace

// Eight elements per thread where n and the buffers allow (for_each8): four streams read and
// three written, 28 bytes per parameter (30 with the bf16 copy), at ~3 TB/s one element per
// thread on the H200. The copy is rounded as convert_f32_bf16 rounds (store8, from_f32), so a
// GEMM reading it multiplies the values it would have rounded itself.
cudaError_t adamw_step(float* w, float* m, float* v, const float* g, void* w_bf16, int64_t n,
                       const AdamWStep& s) {
  auto* w16 = static_cast<bf16_t*>(w_bf16);
  return for_each8(
      n,
      [=] __device__(int64_t c) {
        float wc[8], mc[8], vc[8], gc[8];
        load8(w + 8 * c, wc);
        load8(m + 8 * c, mc);
        load8(v + 8 * c, vc);
        load8(g + 8 * c, gc);
#pragma unroll
        for (int j = 0; j < 8; ++j) adamw_update(wc[j], mc[j], vc[j], gc[j], s);
        store8(w + 8 * c, wc);
        store8(m + 8 * c, mc);
        store8(v + 8 * c, vc);
        if (w16) store8(w16 + 8 * c, wc);
      },
      [=] __device__(int64_t i) {
        adamw_update(w[i], m[i], v[i], g[i], s);
        if (w16) w16[i] = from_f32<bf16_t>(w[i]);
      },
      w, m, v, g, w16 ? w16 : reinterpret_cast<bf16_t*>(w));  // (w again when there is no copy)
}

int64_t sum_squares_blocks(int64_t n) {
  const unsigned b = blocks_for(n);
  return int64_t(b < kMaxSumBlocks ? b : kMaxSumBlocks);
}

cudaError_t sum_squares(double* out, double* partial, const float* x, int64_t n) {
  const int64_t blocks = sum_squares_blocks(n);
  sum_squares_partial_kernel<<<unsigned(blocks), kThreads, 0, stream()>>>(partial, x, n);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  sum_partials_kernel<<<1, kThreads, 0, stream()>>>(out, partial, blocks);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
