// Device-side helpers shared by the .cu files: grid-stride launches of a lambda over n elements,
// row launches of the ops on [rows, heads, width] layouts (for_each_row), deterministic warp/block
// reductions (fixed shuffle trees, so the same inputs give the same bits on every run), and the
// element types of activations (fp32 math on fp32 or bf16 storage).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ops/cuda/stream.h"

namespace moekit::cuda {

constexpr int kThreads = 256;

// Loads each thread issues before it uses the first: with one, a thread waits a DRAM latency per
// element, and 2048 threads per SM keep 8 KB in flight, under 2 TB/s over 132 SMs at a ~600 ns
// latency (Little's law); eight keep 40-64 KB per SM in flight, enough for the HBM's ~4.8 TB/s.
constexpr int kLoadBatch = 8;

// Activation storage types: kernels templated on them compute in fp32, widening a bf16 exactly
// on load and rounding to nearest even on store.
using bf16_t = __nv_bfloat16;

// silu(g) * u, SwiGLU's forward for one element in fp32: the one expression of the SwiGLU kernel
// (cuda_elementwise.cu) and the expert GEMM's epilogue (cuda_expert_gemm.cu), so both give the
// same bits from the same gate and up values.
__device__ inline float silu_mul(float g, float u) {
  return g / (1.0f + expf(-g)) * u;
}

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

// Eight consecutive elements as fp32 registers: the vector path of the elementwise kernels (a
// bf16 chunk is one 16-byte load or store, fp32 two). Pointers 16-byte aligned (all_aligned16).
// Stores round as from_f32 does (to nearest even), pair by pair.
__device__ inline void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
// Two floats rounded to bf16 (nearest even) in one 32-bit word, lo in the low half (the lower
// address).
__device__ inline uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&p);
}
// The eight bf16 values of a 16-byte chunk widened to fp32 (exact: a bf16 is an fp32's upper half).
__device__ inline void widen_bf16x8(const uint4& q, float* v) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);  // the lower address holds the lower half
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ inline void load8(const bf16_t* p, float (&v)[8]) {
  widen_bf16x8(*reinterpret_cast<const uint4*>(p), v);
}
__device__ inline void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ inline void store8(bf16_t* p, const float (&v)[8]) {
  *reinterpret_cast<uint4*>(p) = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                            pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
}
// store8 with the evict-first hint (st.global.cs): for an output far larger than L2 that nothing
// reads soon, so that its lines do not push out what the kernel reads again (the MoE gather's
// source rows, each read by K slots).
__device__ inline void store8_streaming(float* p, const float (&v)[8]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  __stcs(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
}
__device__ inline void store8_streaming(bf16_t* p, const float (&v)[8]) {
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                                 pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7])));
}
// V consecutive elements as fp32: load8/store8 for V = 8 (16-byte accesses), one element for
// V = 1 (the scalar fallback of a kernel templated on its width). Rounding as from_f32.
template <int V, typename T>
__device__ inline void load_n(const T* p, float (&v)[V]) {
  static_assert(V == 8 || V == 1);
  if constexpr (V == 8)
    load8(p, v);
  else
    v[0] = to_f32(p[0]);
}
template <int V, typename T>
__device__ inline void store_n(T* p, const float (&v)[V]) {
  static_assert(V == 8 || V == 1);
  if constexpr (V == 8)
    store8(p, v);
  else
    p[0] = from_f32<T>(v[0]);
}
template <int V, typename T>
__device__ inline void store_n_streaming(T* p, const float (&v)[V]) {
  if constexpr (V == 8)
    store8_streaming(p, v);
  else
    store_n<V>(p, v);
}
// Whether every pointer is 16-byte aligned (host side: picks the vector path).
template <typename... P>
inline bool all_aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
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

// The same over chunks of eight: f8(c) for the elements 8c..8c + 7 where n is a multiple of 8 and
// every pointer in `aligned` is 16-byte aligned (load8 / store8: one or two 16-byte accesses per
// operand), else f1(i) per element. f8 must compute each element as f1 does, so both paths give
// the same bits. One element per thread ran the H200's conversions and axpys at ~1.3-2.6 TB/s
// (one 4-byte load in flight per thread), eight at close to the HBM's rate.
template <typename F8, typename F1, typename... P>
cudaError_t for_each8(int64_t n, F8 f8, F1 f1, const P*... aligned) {
  if (n % 8 == 0 && all_aligned16(aligned...)) return for_each(n / 8, f8);
  return for_each(n, f1);
}

// Row launches. The ops on row-structured tensors (RoPE over [T, heads, stride], the MLA k/v
// split and its backward, column copies, the embedding lookup) take (row, head, unit) from the
// launch instead of dividing a flat element index: for_each's lambdas spent two 64-bit divisions
// per element on `e % width` and `e / width` (the GPU has no 64-bit divide: a software routine of
// dozens of instructions each) and moved 4 bytes per access, which held RoPE into bf16 at ~1.3
// TB/s on the H200 (112 us for q [8192, 16, 192]; ~40 us expected near the HBM's rate). A unit
// is what one thread moves at a time: 8 elements (16-byte accesses) where the widths and the
// buffers' alignment allow, else one.
//
// blockIdx.y is the head; threadIdx.x walks a row's units (striding by blockDim.x in longer rows)
// and threadIdx.y with blockIdx.x picks the row, consecutive threads on consecutive units and rows
// (coalesced where the rows are packed). Each thread takes kRowBatch rows blockDim.y apart and
// loads all of them before it stores any: with 16-byte units, 4-8 loads in flight per thread
// (kLoadBatch's argument). An op whose load already keeps several loads in flight (a sum over
// heads) sets `static constexpr int kRowsPerThread = 1`: more threads instead. Nothing in these
// kernels depends on warps, so any block shape works.
constexpr int kRowBatch = 4;

template <typename Op>
constexpr int rows_per_thread() {
  if constexpr (requires { Op::kRowsPerThread; })
    return Op::kRowsPerThread;
  else
    return kRowBatch;
}

struct RowLaunch {
  dim3 grid, block;
};

// The launch of rows x heads rows of `units` units, `batch` rows per thread (rows, heads, units,
// batch >= 1; heads <= 65535).
inline RowLaunch row_launch(int64_t rows, int heads, int units, int batch) {
  const int x = std::min(units, kThreads), y = std::max(1, kThreads / x);
  const int64_t per_block = int64_t(y) * batch;
  const int64_t blocks = std::min<int64_t>((rows + per_block - 1) / per_block, int64_t(1) << 20);
  return {dim3(unsigned(blocks), unsigned(heads)), dim3(unsigned(x), unsigned(y))};
}

// The body of the row kernels: for every row r < rows (grid-stride), head blockIdx.y and unit
// u < units, op.load(r, head, u, regs) then op.store(r, head, u, regs), a thread's rows' loads
// before their stores. Op: a struct with a Regs type and those two const members; a unit's store
// may write only what its own load read from (in place ops: the same elements).
template <typename Op>
__device__ inline void row_loop(const Op& op, int64_t rows, int units) {
  constexpr int kRows = rows_per_thread<Op>();
  const int head = int(blockIdx.y);
  const int64_t step = int64_t(gridDim.x) * blockDim.y * kRows;
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y * kRows + threadIdx.y; r0 < rows; r0 += step)
    for (int u = int(threadIdx.x); u < units; u += int(blockDim.x)) {
      typename Op::Regs regs[kRows];
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const int64_t r = r0 + int64_t(j) * blockDim.y;
        if (r < rows) op.load(r, head, u, regs[j]);
      }
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const int64_t r = r0 + int64_t(j) * blockDim.y;
        if (r < rows) op.store(r, head, u, regs[j]);
      }
    }
}

template <typename Op>
__global__ void row_kernel(Op op, int64_t rows, int units) {
  row_loop(op, rows, units);
}

// Runs op over rows x heads rows of `units` units (row_loop). Nothing to do when any is 0.
template <typename Op>
cudaError_t for_each_row(int64_t rows, int64_t heads, int64_t units, const Op& op) {
  if (rows <= 0 || heads <= 0 || units <= 0) return cudaSuccess;
  if (heads > 65535 || units > INT32_MAX) return cudaErrorInvalidValue;
  const RowLaunch l = row_launch(rows, int(heads), int(units), rows_per_thread<Op>());
  row_kernel<<<l.grid, l.block, 0, stream()>>>(op, rows, int(units));
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
