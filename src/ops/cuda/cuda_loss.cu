// CUDA kernels, part 3: softmax cross-entropy over the vocabulary. One block per token row: the
// row's max and sum of exp in one read (online softmax, sum in double), then the loss or the
// gradient row: two passes over the logits for the gradient, one for the loss, instead of the
// separate softmax, gather and subtraction a library composition would need.
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

// (max, sum of exp(x - max)) pairs merge exactly like partial softmax denominators: rescale the
// smaller side's sum to the larger max. An empty side (max -inf, sum 0) contributes nothing.
__device__ inline void merge_stats(float& m, double& z, float m2, double z2) {
  const float M = fmaxf(m, m2);
  z = (m == -INFINITY ? 0.0 : z * double(expf(m - M))) +
      (m2 == -INFINITY ? 0.0 : z2 * double(expf(m2 - M)));
  m = M;
}

// Row max and sum of exp(l - max) in one read of the row (an online softmax: each thread keeps
// its running max and rescales its sum when the max grows), then a fixed shuffle tree per warp
// and one over the warps: deterministic. Every thread of the block gets both. The sum is in
// double, as on the CPU (100k float terms in a float sum lose the 1e-5 loss parity).
__device__ void row_softmax_stats(const float* l, int64_t vocab, float& m, double& z) {
  __shared__ float redm[32];
  __shared__ double redz[32];
  float mx = -INFINITY;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = l[i];
    if (x == -INFINITY) continue;
    if (x > mx) {
      s = mx == -INFINITY ? 0.0 : s * double(expf(mx - x));
      mx = x;
    }
    s += double(expf(x - mx));
  }
  for (int o = 16; o > 0; o >>= 1)
    merge_stats(mx, s, __shfl_xor_sync(0xffffffffu, mx, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the shared slots may still be read by a previous call
  if (lane == 0) {
    redm[warp] = mx;
    redz[warp] = s;
  }
  __syncthreads();
  mx = lane < warps ? redm[lane] : -INFINITY;
  s = lane < warps ? redz[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1)
    merge_stats(mx, s, __shfl_xor_sync(0xffffffffu, mx, o), __shfl_xor_sync(0xffffffffu, s, o));
  m = mx;
  z = s;
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

// D: the gradient's storage, float or bf16_t (the fp32 value rounded once: the LM head's dlogits
// under Bf16, which only bf16 GEMMs read).
template <typename D>
__global__ void cross_entropy_backward_kernel(D* dlogits, const float* logits,
                                              const int32_t* targets, int64_t vocab, float scale) {
  const int64_t row = blockIdx.x;
  const int32_t y = targets[row];
  D* d = dlogits + row * vocab;
  if (y < 0) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) d[i] = from_f32<D>(0.0f);
    return;
  }
  const float* l = logits + row * vocab;
  float m;
  double z;
  row_softmax_stats(l, vocab, m, z);
  const float k = float(double(scale) / z);
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
    d[i] = from_f32<D>(expf(l[i] - m) * k - (i == y ? scale : 0.0f));
}

}  // namespace

cudaError_t cross_entropy_forward(float* losses, const float* logits, const int32_t* targets,
                                  int64_t rows, int64_t vocab) {
  if (rows == 0) return cudaSuccess;
  cross_entropy_forward_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(losses, logits, targets,
                                                                          vocab);
  return cudaGetLastError();
}

cudaError_t cross_entropy_backward(void* dlogits, bool dlogits_bf16, const float* logits,
                                   const int32_t* targets, int64_t rows, int64_t vocab,
                                   float scale) {
  if (rows == 0) return cudaSuccess;
  if (dlogits_bf16)
    cross_entropy_backward_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
        static_cast<bf16_t*>(dlogits), logits, targets, vocab, scale);
  else
    cross_entropy_backward_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
        static_cast<float*>(dlogits), logits, targets, vocab, scale);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
