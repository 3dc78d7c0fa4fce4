// Index range checks inside the kernels that read the indices (kernels.h's IndexCheck). A kernel
// cannot throw, so an op that dereferences an index tensor must both stay inside its buffers and
// leave a record for the host: every use of an index goes through checked_index (a bad entry
// becomes the check's replacement, a valid index), and one block of the launch records the first
// bad entry in the backend's error slot (record_first_bad_index), which the next synchronising
// call raises. check_indices_kernel (cuda_elementwise.cu) does the same into a scratch copy; the
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

struct MinPosition {
  __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};

// Records the first bad entry of idx[0, n) (the lowest position) in *c.slot, unless the slot
// already holds an error (kernels run in stream order, so the first failing check claims it). To
// be called by every thread of one block (blockDim.x a multiple of 32, a condition uniform across
// the block such as blockIdx.x == 0): a block-wide reduction of the positions, deterministic.
// Nothing to do without a slot.
__device__ inline void record_first_bad_index(const IndexCheck& c, const int32_t* idx, int64_t n) {
  __shared__ long long first_shared[32];
  if (c.slot == nullptr || n <= 0) return;  // uniform: kernel arguments
  long long first = n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    if (!index_ok(c, idx[i])) {
      first = i;  // this thread's positions only grow
      break;
    }
  first = block_reduce(first, static_cast<long long>(n), first_shared, MinPosition{});
  if (threadIdx.x == 0 && first < n && atomicCAS(&c.slot->check, 0, c.check) == 0) {
    c.slot->value = idx[first];
    c.slot->position = first;
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

}  // namespace moekit::cuda
