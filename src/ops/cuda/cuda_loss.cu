// CUDA kernels, part 3: softmax cross-entropy over the vocabulary. One block per token row: the
// row's max and sum of exp in one read (online softmax, sum in double), then the loss or the
// gradient row: two passes over the logits for the gradient, one for the loss, instead of the
// separate softmax, gather and subtraction a library composition would need. The fused kernel
// gives both from the gradient's two passes (training reads the logits twice, not three times).
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

// Loads each thread issues before it uses the first: with one, a thread waits a DRAM latency per
// element, and 2048 threads per SM keep 8 KB in flight, under 2 TB/s over 132 SMs at a ~600 ns
// latency (Little's law); eight keep 40-64 KB per SM in flight, enough for the HBM's ~4.8 TB/s.
constexpr int kLoadBatch = 8;

// Row max and sum of exp(l - max) in one read of the row (an online softmax: each thread keeps
// its running max and rescales its sum when the max grows), then a fixed shuffle tree per warp
// and one over the warps: deterministic. Every thread of the block gets both. The sum is in
// double, as on the CPU (100k float terms in a float sum lose the 1e-5 loss parity). Thread t
// takes elements t, t + blockDim.x, ... in that order, kLoadBatch loads at a time; the padding
// past the row's end is -inf, which the update skips like a -inf logit, so the batching leaves
// every result bit as the one-at-a-time loop gave it.
__device__ void row_softmax_stats(const float* l, int64_t vocab, float& m, double& z) {
  __shared__ float redm[32];
  __shared__ double redz[32];
  float mx = -INFINITY;
  double s = 0.0;
  const int64_t step = blockDim.x;
  for (int64_t i0 = threadIdx.x; i0 < vocab; i0 += kLoadBatch * step) {
    float xs[kLoadBatch];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j)
      xs[j] = i0 + j * step < vocab ? l[i0 + j * step] : -INFINITY;
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const float x = xs[j];
      if (x == -INFINITY) continue;
      if (x > mx) {
        s = mx == -INFINITY ? 0.0 : s * double(expf(mx - x));
        mx = x;
      }
      s += double(expf(x - mx));
    }
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

// One gradient element, (softmax - onehot) * scale with k = scale / z: the one expression both
// gradient kernels evaluate, so that the fused kernel's dlogits are the backward kernel's bits.
__device__ inline float ce_grad(float x, float m, float k, bool target, float scale) {
  return expf(x - m) * k - (target ? scale : 0.0f);
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
    d[i] = from_f32<D>(ce_grad(l[i], m, k, i == y, scale));
}

// Loss and gradient of a row from one set of statistics: the backward kernel plus the loss, so
// the forward kernel's read of the row is saved. The statistics come from the same
// row_softmax_stats with the same block size and the gradient from the same ce_grad, hence the
// same bits as the separate kernels; only the order of the gradient's stores differs.
// Why not one read: a 102,400-entry fp32 row (400 KB) fits neither a block's shared memory
// (227 KB) nor an SM's registers (256 KB), and the gradient needs the row's max and sum before
// its first element. So the gradient pass re-reads the row, from its end: what the statistics
// pass read last comes first, while it is the likeliest to be still in L2 (50 MB on the H200);
// the stores stream (evict-first) so that they do not push the logits out. No hit rate is
// promised: with 5 blocks per SM each streaming its own row, ~660 rows (260 MB) are in flight;
// the saving that does not depend on L2 is the forward kernel's read. Loads go kLoadBatch at a
// time here too (the backward kernel's gradient loop issues one).
template <typename D>
__global__ void cross_entropy_fused_kernel(float* losses, D* dlogits, const float* logits,
                                           const int32_t* targets, int64_t vocab, float scale) {
  const int64_t row = blockIdx.x;
  const int32_t y = targets[row];
  D* d = dlogits + row * vocab;
  if (y < 0) {  // the whole block agrees, so no thread waits at a barrier
    if (threadIdx.x == 0) losses[row] = 0.0f;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) __stcs(d + i, from_f32<D>(0.0f));
    return;
  }
  const float* l = logits + row * vocab;
  // Read before row_softmax_stats: its barriers order this read before any thread's store, which
  // in place (d == l) overwrites l[y].
  const float target_logit = threadIdx.x == 0 ? l[y] : 0.0f;
  float m;
  double z;
  row_softmax_stats(l, vocab, m, z);
  if (threadIdx.x == 0) losses[row] = float(log(z) + double(m) - double(target_logit));
  const float k = float(double(scale) / z);
  // Groups of kLoadBatch block-wide chunks, the last group first. Every element is read and then
  // written by one thread (in place, no other thread reads it after the statistics' barriers).
  const int64_t step = blockDim.x, group = kLoadBatch * step;
  for (int64_t g = (vocab - 1) / group * group; g >= 0; g -= group) {
    float xs[kLoadBatch];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int64_t i = g + j * step + threadIdx.x;
      xs[j] = i < vocab ? l[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int64_t i = g + j * step + threadIdx.x;
      if (i < vocab) __stcs(d + i, from_f32<D>(ce_grad(xs[j], m, k, i == y, scale)));
    }
  }
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

cudaError_t cross_entropy_fused(float* losses, void* dlogits, bool dlogits_bf16,
                                const float* logits, const int32_t* targets, int64_t rows,
                                int64_t vocab, float scale) {
  if (rows == 0) return cudaSuccess;
  if (dlogits_bf16)
    cross_entropy_fused_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
        losses, static_cast<bf16_t*>(dlogits), logits, targets, vocab, scale);
  else
    cross_entropy_fused_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
        losses, static_cast<float*>(dlogits), logits, targets, vocab, scale);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
