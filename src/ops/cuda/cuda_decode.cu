// CUDA kernels of decoding: the causal row softmax of attention over the cache
// (Backend::causal_softmax) and the greedy pick (Backend::argmax), so that a decode step reads
// back one token id, not scores or logits. One block per row: block-wide reductions with fixed
// trees (deterministic), then the write.
#include <cmath>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

__global__ void causal_softmax_kernel(float* x, int64_t cols, int64_t group, int64_t offset) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  float* s = x + r * cols;
  const int64_t limit = offset + r / group, n = limit < cols ? limit : cols;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, s[j]);
  m = block_reduce(m, -INFINITY, red, Max{});
  float z = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) z += expf(s[j] - m);
  z = block_reduce(z, 0.0f, red, Sum{});
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s[j] = j < n ? expf(s[j] - m) / z : 0.0f;
}

// Orders (value, index) pairs as one integer: larger value first, then the smaller index (the
// first maximum, as std::max_element). Floats map to unsigned integers in their total order.
__device__ inline unsigned long long argmax_key(float v, int64_t j) {
  const unsigned bits = __float_as_uint(v);
  const unsigned ordered = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<unsigned long long>(ordered) << 32) | (0xffffffffu - unsigned(j));
}

struct MaxKey {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a > b ? a : b;
  }
};

__global__ void argmax_kernel(int32_t* idx, const float* x, int64_t cols, int64_t n) {
  __shared__ unsigned long long red[32];
  const float* row = x + blockIdx.x * cols;
  unsigned long long best = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const unsigned long long k = argmax_key(row[j], j);
    best = k > best ? k : best;
  }
  best = block_reduce(best, 0ull, red, MaxKey{});
  if (threadIdx.x == 0) idx[blockIdx.x] = int32_t(0xffffffffu - unsigned(best & 0xffffffffu));
}

}  // namespace

cudaError_t argmax(int32_t* idx, const float* x, int64_t rows, int64_t cols, int64_t n) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  argmax_kernel<<<unsigned(rows), 1024, 0, stream()>>>(idx, x, cols, n);
  return cudaGetLastError();
}

cudaError_t causal_softmax(float* x, int64_t rows, int64_t cols, int64_t group, int64_t offset) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  // Decode rows are short (the context so far): fewer threads idle on a short row.
  const int threads = cols >= 1024 ? 256 : (cols >= 256 ? 128 : 64);
  causal_softmax_kernel<<<unsigned(rows), threads, 0, stream()>>>(x, cols, group, offset);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
