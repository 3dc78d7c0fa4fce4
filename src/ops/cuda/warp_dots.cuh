// Memory-bound dot products for GEMVs (few-token MoE experts, few-row GEMMs with weights read
// once): one warp streams up to R weight rows against R activation rows with 16-byte loads, bf16
// weights widened exactly from their bit patterns. Shared by cuda_moe.cu and cuda_gemv.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"

namespace moekit::cuda {

// bf16 weights are handled as their bit patterns: a bf16 is the upper half of an fp32, so
// widening is a shift (exact), with no dependence on cuda_bf16.h's operator set. (to_f32 of a
// float and of a __nv_bfloat16: device_util.cuh.)
__device__ inline float to_f32(uint16_t v) {
  return __uint_as_float(uint32_t(v) << 16);
}

// 16 bytes of a weight row widened to fp32: 4 floats or 8 bf16. widen() takes the 16 raw bytes
// (kernels that load before they compute keep them as they came), load() reads them first.
template <typename W>
struct Chunk;
template <>
struct Chunk<float> {
  static constexpr int n = 4;
  __device__ static void widen(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
  __device__ static void load(const float* p, float* out) {
    widen(*reinterpret_cast<const uint4*>(p), out);
  }
};
template <>
struct Chunk<uint16_t> {
  static constexpr int n = 8;
  __device__ static void widen(const uint4& v, float* out) { widen_bf16x8(v, out); }
  __device__ static void load(const uint16_t* p, float* out) {
    widen(*reinterpret_cast<const uint4*>(p), out);
  }
};

__device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// acc[r] = dot(w[r][0, n), a[r][0, n)) for r < nr (nr <= R), the result in every lane. The R rows
// are streamed in one loop so their loads are in flight together (a GEMV is bound by how many
// bytes are outstanding). 16-byte vector loads when every row starts 16-byte aligned (uniform
// across the warp: all lanes look at the same rows), else element by element. Each lane sums its
// elements in a fixed order, then the shuffle tree: deterministic.
template <typename W, int R>
__device__ inline void warp_dots(float (&acc)[R], const W* const* w, const float* const* a, int nr,
                                 int64_t n) {
  constexpr int V = Chunk<W>::n;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  bool vec = true;
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (r < nr) vec = vec && aligned16(w[r]) && aligned16(a[r]);
  int64_t done = 0;
  // Loads in flight per lane: one 16-byte chunk per row and unrolled iteration. Measured on an
  // H200 (batch-1 decode), 2 iterations left one-row GEMVs at ~30% of the memory bandwidth.
  constexpr int kUnroll = R == 1 ? 8 : (R == 2 ? 4 : 2);
  if (vec) {
    const int64_t chunks = n / V;
#pragma unroll kUnroll
    for (int64_t c = lane; c < chunks; c += 32) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= nr) continue;
        float wv[V], av[V];
        Chunk<W>::load(w[r] + c * V, wv);
#pragma unroll
        for (int q = 0; q < V; q += 4) Chunk<float>::load(a[r] + c * V + q, av + q);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[r] = fmaf(wv[i], av[i], acc[r]);
      }
    }
    done = chunks * V;
  }
  for (int64_t c = done + lane; c < n; c += 32) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < nr) acc[r] = fmaf(to_f32(w[r][c]), a[r][c], acc[r]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = warp_reduce(acc[r], Sum{});
}

}  // namespace moekit::cuda
