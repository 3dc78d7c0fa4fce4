// CUDA kernels, part 2: RMSNorm forward and backward. One block per row (a block-wide sum of
// squares, then the scaled write) fuses what would otherwise be a reduction and two elementwise
// passes; the weight gradient sums over rows in fixed chunks and then over the chunks in order,
// so it is reproducible without float atomics.
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

constexpr int64_t kDwChunk = 64;  // rows per partial sum of the weight gradient

__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* x, const float* w,
                                       int64_t dim, float eps) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) ss += xr[c] * xr[c];
  ss = block_reduce(ss, 0.0f, red, Sum{});
  const float r = 1.0f / sqrtf(ss / float(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  float* o = out + row * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) o[c] = w[c] * (xr[c] * r);
}

// y = w * x * r, r = (mean x^2 + eps)^-1/2:  dx = r * (w*dy) - x * r^3 / C * sum(w*dy*x).
__global__ void rmsnorm_backward_dx_kernel(float* dx, const float* dout, const float* x,
                                           const float* w, const float* rstd, int64_t dim) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const float *xr = x + row * dim, *g = dout + row * dim;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) dot += w[c] * g[c] * xr[c];
  dot = block_reduce(dot, 0.0f, red, Sum{});
  const float r = rstd[row], k = dot * r * r * r / float(dim);
  float* d = dx + row * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) d[c] = r * w[c] * g[c] - k * xr[c];
}

// partial[chunk, c] = sum over the chunk's rows (in order) of dout * x * rstd.
__global__ void rmsnorm_dw_partial_kernel(float* partial, const float* dout, const float* x,
                                          const float* rstd, int64_t rows, int64_t dim) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= dim) return;
  const int64_t r0 = blockIdx.y * kDwChunk;
  const int64_t r1 = r0 + kDwChunk < rows ? r0 + kDwChunk : rows;
  float s = 0.0f;
  for (int64_t r = r0; r < r1; ++r) s += dout[r * dim + c] * x[r * dim + c] * rstd[r];
  partial[blockIdx.y * dim + c] = s;
}

}  // namespace

cudaError_t rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t rows,
                            int64_t dim, float eps) {
  if (rows == 0) return cudaSuccess;
  rmsnorm_forward_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(out, rstd, x, w, dim, eps);
  return cudaGetLastError();
}

cudaError_t rmsnorm_backward_dx(float* dx, const float* dout, const float* x, const float* w,
                                const float* rstd, int64_t rows, int64_t dim) {
  if (rows == 0) return cudaSuccess;
  rmsnorm_backward_dx_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(dx, dout, x, w, rstd, dim);
  return cudaGetLastError();
}

int64_t rmsnorm_dw_chunks(int64_t rows) {
  return (rows + kDwChunk - 1) / kDwChunk;
}

cudaError_t rmsnorm_backward_dw(float* dw, float* partial, const float* dout, const float* x,
                                const float* rstd, int64_t rows, int64_t dim) {
  const int64_t chunks = rmsnorm_dw_chunks(rows);
  if (chunks == 0 || dim == 0) return cudaSuccess;
  dim3 grid(unsigned((dim + kThreads - 1) / kThreads), unsigned(chunks));
  rmsnorm_dw_partial_kernel<<<grid, kThreads, 0, stream()>>>(partial, dout, x, rstd, rows, dim);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return for_each(dim, [=] __device__(int64_t c) {
    float s = 0.0f;
    for (int64_t k = 0; k < chunks; ++k) s += partial[k * dim + c];
    dw[c] += s;
  });
}

}  // namespace moekit::cuda
