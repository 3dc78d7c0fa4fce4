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

cudaError_t adamw_step(float* w, float* m, float* v, const float* g, int64_t n,
                       const AdamWStep& s) {
  return for_each(n, [=] __device__(int64_t i) {
    const float gi = g[i];
    const float mi = s.beta1 * m[i] + (1.0f - s.beta1) * gi;
    const float vi = s.beta2 * v[i] + (1.0f - s.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float wi = w[i];
    wi -= s.decay * wi;  // decoupled decay
    wi -= s.step_size * mi / (sqrtf(vi * s.inv_bc2) + s.eps);
    w[i] = wi;
  });
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
