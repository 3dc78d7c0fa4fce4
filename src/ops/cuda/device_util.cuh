// Device-side helpers shared by the .cu files: grid-stride launches of a lambda over n elements,
// deterministic warp/block reductions (fixed shuffle trees, so the same inputs give the same
// bits on every run), and the element types of activations (fp32 math on fp32 or bf16 storage).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/stream.h"

namespace moekit::cuda {

constexpr int kThreads = 256;

// Activation storage types: kernels templated on them compute in fp32, widening a bf16 exactly
// on load and rounding to nearest even on store.
using bf16_t = __nv_bfloat16;
__device__ inline float to_f32(float v) {
  return v;
}
__device__ inline float to_f32(bf16_t v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ inline T from_f32(float v);
template <>
__device__ inline float from_f32<float>(float v) {
  return v;
}
template <>
__device__ inline bf16_t from_f32<bf16_t>(float v) {
  return __float2bfloat16_rn(v);
}

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return unsigned(b < 65535 * 64 ? b : 65535 * 64);  // grid-stride loops cover the rest
}

template <typename F>
__global__ void map_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    f(i);
}

// Runs f(i) for i in [0, n) (elementwise ops: one pass, no library call fits moekit's layouts).
template <typename F>
cudaError_t for_each(int64_t n, F f) {
  if (n <= 0) return cudaSuccess;
  map_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(n, f);
  return cudaGetLastError();
}

template <typename T, typename Combine>
__device__ inline T warp_reduce(T v, Combine combine) {
  for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction (blockDim.x a multiple of 32): a warp tree, then one warp over the
// partials. Every thread gets the result. `shared` holds 32 T.
template <typename T, typename Combine>
__device__ inline T block_reduce(T v, T identity, T* shared, Combine combine) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, combine);
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : identity;
  return warp_reduce(v, combine);
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

}  // namespace moekit::cuda
