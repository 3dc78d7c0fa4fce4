// CUDA kernels, part 3: softmax cross-entropy over the vocabulary. One block per token row: a
// block max, a block sum of exp in double (as the CPU backend: 100k float terms in a float sum
// lose the 1e-5 loss parity), then the loss or the gradient row — one read of the logits per pass
// instead of the separate softmax, gather and subtraction a library composition would need.
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

// Row max and sum of exp(l - max); every thread of the block gets both.
__device__ void row_softmax_stats(const float* l, int64_t vocab, float& m, double& z) {
  __shared__ float redf[32];
  __shared__ double redd[32];
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, l[i]);
  m = block_reduce(mx, -INFINITY, redf, Max{});
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) s += double(expf(l[i] - m));
  z = block_reduce(s, 0.0, redd, Sum{});
}

__global__ void cross_entropy_forward_kernel(float* losses, const float* logits,
                                             const int32_t* targets, int64_t vocab) {
  const int64_t row = blockIdx.x;
  const int32_t y = targets[row];
  if (y < 0) {  // ignored target (the whole block agrees, so no thread waits at a barrier)
    if (threadIdx.x == 0) losses[row] = 0.0f;
    return;
  }
  const float* l = logits + row * vocab;
  float m;
  double z;
  row_softmax_stats(l, vocab, m, z);
  if (threadIdx.x == 0) losses[row] = float(log(z) + double(m) - double(l[y]));
}

__global__ void cross_entropy_backward_kernel(float* dlogits, const float* logits,
                                              const int32_t* targets, int64_t vocab, float scale) {
  const int64_t row = blockIdx.x;
  const int32_t y = targets[row];
  float* d = dlogits + row * vocab;
  if (y < 0) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) d[i] = 0.0f;
    return;
  }
  const float* l = logits + row * vocab;
  float m;
  double z;
  row_softmax_stats(l, vocab, m, z);
  const float k = float(double(scale) / z);
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
    d[i] = expf(l[i] - m) * k - (i == y ? scale : 0.0f);
}

}  // namespace

cudaError_t cross_entropy_forward(float* losses, const float* logits, const int32_t* targets,
                                  int64_t rows, int64_t vocab) {
  if (rows == 0) return cudaSuccess;
  cross_entropy_forward_kernel<<<unsigned(rows), kThreads>>>(losses, logits, targets, vocab);
  return cudaGetLastError();
}

cudaError_t cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets,
                                   int64_t rows, int64_t vocab, float scale) {
  if (rows == 0) return cudaSuccess;
  cross_entropy_backward_kernel<<<unsigned(rows), kThreads>>>(dlogits, logits, targets, vocab,
                                                              scale);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
