// CUDA kernels, part 2: RMSNorm forward and backward. One block per row (a block-wide sum of
// squares, then the scaled write; in the forward the row is held in registers when it fits)
// fuses what would otherwise be a reduction and two elementwise passes; the weight gradient sums
// over rows in fixed chunks and then over the chunks in order, so it is reproducible without float
// atomics. The forward's output is fp32 or bf16 (OutT): the bf16 instance computes the same fp32
// value and rounds it at the store, so a norm whose output only bf16 GEMMs read needs no
// conversion pass after it. The backward adds into dx when asked (a residual stream's gradient)
// and can write a bf16 copy of the final dx alongside (for a reader that is only bf16 GEMMs).
#include <cstdint>

#include "ops/cuda/dependent_launch.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

constexpr int64_t kDwChunk = 64;  // rows per partial sum of the weight gradient

// The general forward: one block of kThreads per row, any length and alignment (rows too long for
// rmsnorm_forward_regs_kernel, or not 16-byte aligned).
template <typename OutT>
__global__ void rmsnorm_forward_kernel(OutT* out, float* rstd, const float* x, const float* w,
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
  OutT* o = out + row * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) o[c] = from_f32<OutT>(w[c] * (xr[c] * r));
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

// V values of a row to out: one 16-byte (fp32) or 8-byte (bf16, pairs rounded as from_f32 does)
// store when V = 4 (out aligned to it), else single elements.
template <int V>
__device__ inline void store_vec(float* out, const float (&v)[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(out) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = v[i];
  }
}
template <int V>
__device__ inline void store_vec(bf16_t* out, const float (&v)[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<uint2*>(out) = make_uint2(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = from_f32<bf16_t>(v[i]);
  }
}

template <int V, typename OutT>
__global__ void rmsnorm_forward_regs_kernel(OutT* out, float* rstd, const float* x, const float* w,
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
  OutT* o = out + row * dim;
#pragma unroll
  for (int q = 0; q < kNormVecs; ++q) {
    const int64_t c = (int64_t(q) * blockDim.x + threadIdx.x) * V;
    if (c >= dim) continue;
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = wv[q][i] * (xv[q][i] * r);
    store_vec<V>(o + c, v);
  }
}

// y = w * x * r, r = (mean x^2 + eps)^-1/2:  dx = r * (w*dy) - x * r^3 / C * sum(w*dy*x).
// accumulate: dx += that (the value computed alike, then added). dx_bf16 (may be null): the
// final dx rounded to bf16.
__global__ void rmsnorm_backward_dx_kernel(float* dx, bf16_t* dx_bf16, const float* dout,
                                           const float* x, const float* w, const float* rstd,
                                           int64_t dim, bool accumulate) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const float *xr = x + row * dim, *g = dout + row * dim;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) dot += w[c] * g[c] * xr[c];
  dot = block_reduce(dot, 0.0f, red, Sum{});
  const float r = rstd[row], k = dot * r * r * r / float(dim);
  float* d = dx + row * dim;
  bf16_t* d16 = dx_bf16 ? dx_bf16 + row * dim : nullptr;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    const float v = r * w[c] * g[c] - k * xr[c];
    const float out = accumulate ? d[c] + v : v;
    d[c] = out;
    if (d16) d16[c] = from_f32<bf16_t>(out);
  }
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

template <typename OutT>
cudaError_t rmsnorm_forward_as(OutT* out, float* rstd, const float* x, const float* w, int64_t rows,
                               int64_t dim, float eps) {
  auto aligned = [](const void* p, size_t bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
  };
  // The vector path stores 4 elements at once (16 bytes of fp32, 8 of bf16). For the bf16 output
  // to be the fp32 one rounded, both must pick the same path (it fixes the order of the sum of
  // squares): they do whenever out is as aligned as a row start of its own dtype (dim % 4 == 0).
  const bool vec =
      dim % 4 == 0 && aligned(x, 16) && aligned(w, 16) && aligned(out, 4 * sizeof(OutT));
  const int64_t vecs = vec ? dim / 4 : dim;
  const int64_t threads = ((vecs + kNormVecs - 1) / kNormVecs + 31) / 32 * 32;
  // Dependent launches (dependent_launch.cuh): a decode step's norms sit between short kernels.
  if (threads > kNormMaxThreads)
    return launch_dependent(rmsnorm_forward_kernel<OutT>, dim3(unsigned(rows)), dim3(kThreads), out,
                            rstd, x, w, dim, eps);
  const unsigned block = unsigned(threads < 32 ? 32 : threads);
  return launch_dependent(
      vec ? rmsnorm_forward_regs_kernel<4, OutT> : rmsnorm_forward_regs_kernel<1, OutT>,
      dim3(unsigned(rows)), dim3(block), out, rstd, x, w, dim, eps);
}

}  // namespace

cudaError_t rmsnorm_forward(void* out, DType out_dtype, float* rstd, const float* x, const float* w,
                            int64_t rows, int64_t dim, float eps) {
  if (rows == 0) return cudaSuccess;
  if (out_dtype == DType::BF16)
    return rmsnorm_forward_as(static_cast<bf16_t*>(out), rstd, x, w, rows, dim, eps);
  return rmsnorm_forward_as(static_cast<float*>(out), rstd, x, w, rows, dim, eps);
}

cudaError_t rmsnorm_backward_dx(float* dx, void* dx_bf16, const float* dout, const float* x,
                                const float* w, const float* rstd, int64_t rows, int64_t dim,
                                bool accumulate) {
  if (rows == 0) return cudaSuccess;
  rmsnorm_backward_dx_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
      dx, static_cast<bf16_t*>(dx_bf16), dout, x, w, rstd, dim, accumulate);
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
