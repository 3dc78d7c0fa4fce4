// CUDA kernels, part 2: RMSNorm forward and backward. One block per row (a block-wide sum of
// squares, then the scaled write; in the forward the row is held in registers when it fits)
// fuses what would otherwise be a reduction and two elementwise passes; the weight gradient sums
// over rows in fixed chunks and then over the chunks in order, so it is reproducible without float
// atomics.
#include <cstdint>

#include "ops/cuda/dependent_launch.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

constexpr int64_t kDwChunk = 64;  // rows per partial sum of the weight gradient

// The general forward: one block of kThreads per row, any length and alignment (rows too long for
// rmsnorm_forward_regs_kernel, or not 16-byte aligned).
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* x, const float* w,
                                       int64_t dim, float eps) {
  __shared__ float red[32];
  allow_dependents();
  wait_for_inputs();
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

// The forward with the row in registers. A decode step normalises one row (2048, or the 512 of
// the latent) three times per layer, and the general kernel took 4.46 us per launch on the H200
// for it (CUPTI, V2-Lite): pure latency, x read in a strided loop, a block-wide reduction of 8
// warps, then x read again and w read only after the reduction. Here each thread loads its up to
// kNormVecs vectors of x and of w at once (16-byte loads, V = 4, when the row allows; else
// single floats), so one memory round trip covers both; the block is sized to the row (2048: 128
// threads; 512: one warp, whose reduction needs no shared memory or barrier); the outputs are
// written from the registers. Expected ~2 us per launch. Deterministic: fixed per-thread order,
// then the fixed shuffle tree.
constexpr int kNormVecs = 4;           // vectors per thread
constexpr int kNormMaxThreads = 1024;  // rows up to 1024 * kNormVecs * V floats

// V floats from p (16-byte aligned when V = 4).
template <int V>
__device__ inline void load_vec(const float* p, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = p[i];
  }
}

template <int V>
__global__ void rmsnorm_forward_regs_kernel(float* out, float* rstd, const float* x, const float* w,
                                            int64_t dim, float eps) {
  __shared__ float red[32];
  allow_dependents();
  wait_for_inputs();
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float xv[kNormVecs][V], wv[kNormVecs][V];
#pragma unroll
  for (int q = 0; q < kNormVecs; ++q) {
    const int64_t c = (int64_t(q) * blockDim.x + threadIdx.x) * V;
    if (c < dim) {  // V divides dim: whole vectors
      load_vec<V>(xr + c, xv[q]);
      load_vec<V>(w + c, wv[q]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) xv[q][i] = wv[q][i] = 0.0f;
    }
  }
  float ss = 0.0f;
#pragma unroll
  for (int q = 0; q < kNormVecs; ++q)
#pragma unroll
    for (int i = 0; i < V; ++i) ss += xv[q][i] * xv[q][i];
  ss = blockDim.x == 32 ? warp_reduce(ss, Sum{}) : block_reduce(ss, 0.0f, red, Sum{});
  const float r = 1.0f / sqrtf(ss / float(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  float* o = out + row * dim;
#pragma unroll
  for (int q = 0; q < kNormVecs; ++q) {
    const int64_t c = (int64_t(q) * blockDim.x + threadIdx.x) * V;
    if (c >= dim) continue;
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = wv[q][i] * (xv[q][i] * r);
    if constexpr (V == 4)
      *reinterpret_cast<float4*>(o + c) = make_float4(v[0], v[1], v[2], v[3]);
    else
      o[c] = v[0];
  }
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
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = dim % 4 == 0 && aligned(x) && aligned(w) && aligned(out);
  const int64_t vecs = vec ? dim / 4 : dim;
  const int64_t threads = ((vecs + kNormVecs - 1) / kNormVecs + 31) / 32 * 32;
  // Dependent launches (dependent_launch.cuh): a decode step's norms sit between short kernels.
  if (threads > kNormMaxThreads)
    return launch_dependent(rmsnorm_forward_kernel, dim3(unsigned(rows)), dim3(kThreads), out, rstd,
                            x, w, dim, eps);
  const unsigned block = unsigned(threads < 32 ? 32 : threads);
  return launch_dependent(vec ? rmsnorm_forward_regs_kernel<4> : rmsnorm_forward_regs_kernel<1>,
                          dim3(unsigned(rows)), dim3(block), out, rstd, x, w, dim, eps);
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
