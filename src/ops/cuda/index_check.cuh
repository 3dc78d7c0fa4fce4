// Index range checks inside the kernels that read the indices (kernels.h's IndexCheck). A kernel
// cannot throw, so an op that dereferences an index tensor must both stay inside its buffers and
// leave a record for the host: every use of an index goes through checked_index (a bad entry
// becomes the check's replacement, a valid index), and one block of the launch records the first
// bad entry in the backend's error slot (record_first_bad_index; for_each_checked and
// for_each_row_checked launch it in their first block), which the next synchronising call
// raises. check_indices_kernel (cuda_elementwise.cu) does the same into a scratch copy; the
// decode path's ops fold it into their own kernel instead, because the check kernel and its copy
// cost ~1.6 us per index op on the H200, about six times per layer of a decode step.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

__device__ inline bool index_ok(const IndexCheck& c, int32_t v) {
  return (v >= 0 || c.allow_negative) && v < c.limit;
}

// The index to use for the entry v: v itself when valid, else the replacement.
__device__ inline int32_t checked_index(const IndexCheck& c, int32_t v) {
  return index_ok(c, v) ? v : c.replacement;
}

// The lowest position p in [0, n) with a bad idx[p] among those this thread takes, n if none: the
// thread `tid` of `threads` takes the W-entry chunks tid, tid + threads, ... (W = 4: 16-byte loads,
// idx 16-byte aligned), kLoadBatch chunks loaded before any is checked, and the < W entries past
// the last whole chunk one each (threads tid < n % W). Its positions only grow, so the first bad
// one it meets is its lowest.
template <int W>
__device__ inline int64_t first_bad_index(const IndexCheck& c, const int32_t* idx, int64_t n,
                                          int tid, int threads) {
  static_assert(W == 4 || W == 1);
  const int64_t chunks = n / W;
  for (int64_t c0 = tid; c0 < chunks; c0 += int64_t(kLoadBatch) * threads) {
    int32_t v[kLoadBatch][W] = {};
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int64_t k = c0 + int64_t(j) * threads;
      if (k >= chunks) continue;
      if constexpr (W == 4) {
        const int4 q = reinterpret_cast<const int4*>(idx)[k];
        v[j][0] = q.x, v[j][1] = q.y, v[j][2] = q.z, v[j][3] = q.w;
      } else {
        v[j][0] = idx[k];
      }
    }
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int64_t k = c0 + int64_t(j) * threads;
#pragma unroll
      for (int i = 0; i < W; ++i)
        if (k < chunks && !index_ok(c, v[j][i])) return k * W + i;
    }
  }
  const int64_t tail = chunks * W + tid;
  return tail < n && !index_ok(c, idx[tail]) ? tail : n;
}

// Records the first bad entry of idx[0, n) (the lowest position) in *c.slot, unless the slot
// already holds an error (kernels run in stream order, so the first failing check claims it). To
// be called by every thread of one block (any shape; a condition uniform across the block such as
// blockIdx.x == 0). The positions meet in a shared atomicMin: a minimum, so the same in any order.
// The block reads idx with 16-byte loads, kLoadBatch of them in flight per thread: a scan of one
// entry per thread at a time (a DRAM latency each) kept check_indices_kernel at 14.6 us for
// 8192 x 6 top-k indices on the H200, and the one block of every checked launch behind the rest.
// Nothing to do without a slot.
__device__ inline void record_first_bad_index(const IndexCheck& c, const int32_t* idx, int64_t n) {
  __shared__ long long first_shared;
  if (c.slot == nullptr || n <= 0) return;  // uniform: kernel arguments
  const int tid = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  const int threads = int(blockDim.x * blockDim.y * blockDim.z);
  if (tid == 0) first_shared = n;
  __syncthreads();
  const int64_t first = reinterpret_cast<uintptr_t>(idx) % 16 == 0
                            ? first_bad_index<4>(c, idx, n, tid, threads)
                            : first_bad_index<1>(c, idx, n, tid, threads);
  if (first < n) atomicMin(&first_shared, static_cast<long long>(first));
  __syncthreads();
  const long long lowest = first_shared;
  if (tid == 0 && lowest < n && atomicCAS(&c.slot->check, 0, c.check) == 0) {
    c.slot->value = idx[lowest];
    c.slot->position = lowest;
  }
}

template <typename F>
__global__ void checked_map_kernel(int64_t n, F f, IndexCheck c, const int32_t* idx,
                                   int64_t n_idx) {
  if (blockIdx.x == 0) record_first_bad_index(c, idx, n_idx);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    f(i);
}

// for_each (device_util.cuh) of an op whose elements read the indices idx[0, n_idx): f must pass
// every index it uses through checked_index(c, .); block 0 records the first bad one. Launches
// even when n = 0, so that the indices are still checked.
template <typename F>
cudaError_t for_each_checked(int64_t n, const IndexCheck& c, const int32_t* idx, int64_t n_idx,
                             F f) {
  if (n <= 0 && (n_idx <= 0 || c.slot == nullptr)) return cudaSuccess;
  checked_map_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(n, f, c, idx, n_idx);
  return cudaGetLastError();
}

template <typename Op>
__global__ void checked_row_kernel(Op op, int64_t rows, int units, IndexCheck c, const int32_t* idx,
                                   int64_t n_idx) {
  if (blockIdx.x == 0 && blockIdx.y == 0) record_first_bad_index(c, idx, n_idx);
  row_loop(op, rows, units);
}

// for_each_row (device_util.cuh) of an op that reads the indices idx[0, n_idx), as
// for_each_checked: op passes every index through checked_index(c, .), block (0, 0) records the
// first bad one, and the launch happens even with nothing else to do.
template <typename Op>
cudaError_t for_each_row_checked(int64_t rows, int64_t heads, int64_t units, const IndexCheck& c,
                                 const int32_t* idx, int64_t n_idx, const Op& op) {
  const bool empty = rows <= 0 || heads <= 0 || units <= 0;
  if (empty && (n_idx <= 0 || c.slot == nullptr)) return cudaSuccess;
  if (heads > 65535 || units > INT32_MAX) return cudaErrorInvalidValue;
  const RowLaunch l = empty ? row_launch(1, 1, 1, 1)
                            : row_launch(rows, int(heads), int(units), rows_per_thread<Op>());
  checked_row_kernel<<<l.grid, l.block, 0, stream()>>>(op, empty ? 0 : rows, empty ? 0 : int(units),
                                                       c, idx, n_idx);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
