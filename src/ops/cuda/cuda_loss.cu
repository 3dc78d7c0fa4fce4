// CUDA kernels, part 3: softmax cross-entropy over the vocabulary. One block per token row: the
// row's max and sum of exp in one read (online softmax, sum in double), then the loss or the
// gradient row: two passes over the logits for the gradient, one for the loss, instead of the
// separate softmax, gather and subtraction a library composition would need. The fused kernel
// gives both from the gradient's two passes (training reads the logits twice, not three times).
// Under Bf16 the LM head's training logits are bf16: the fused op then stages each row in shared
// memory (200 KB at V2-Lite's vocabulary), reads it from HBM once and writes the bf16 gradient
// over it; a row too long for a block's shared memory takes the two-pass kernel on bf16 logits.
#include <map>
#include <mutex>
#include <utility>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/mma_util.cuh"

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

// Every thread's (max, sum) merged by a fixed shuffle tree per warp and one over the warps:
// deterministic, and every thread of the block gets the row's pair. blockDim.x a multiple of 32,
// at most 1024.
__device__ void block_softmax_stats(float& m, double& z) {
  __shared__ float redm[32];
  __shared__ double redz[32];
  for (int o = 16; o > 0; o >>= 1)
    merge_stats(m, z, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, z, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the shared slots may still be read by a previous call
  if (lane == 0) {
    redm[warp] = m;
    redz[warp] = z;
  }
  __syncthreads();
  m = lane < warps ? redm[lane] : -INFINITY;
  z = lane < warps ? redz[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1)
    merge_stats(m, z, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, z, o));
}

// Row max and sum of exp(l - max) in one read of the row (an online softmax: each thread keeps
// its running max and rescales its sum when the max grows), then block_softmax_stats. The sum is
// in double, as on the CPU (100k float terms in a float sum lose the 1e-5 loss parity). Thread t
// takes elements t, t + blockDim.x, ... in that order, kLoadBatch loads at a time; the padding
// past the row's end is -inf, which the update skips like a -inf logit, so the batching leaves
// every result bit as the one-at-a-time loop gave it. L: the logits' storage, float or bf16_t
// (widened exactly).
template <typename L>
__device__ void row_softmax_stats(const L* l, int64_t vocab, float& m, double& z) {
  float mx = -INFINITY;
  double s = 0.0;
  const int64_t step = blockDim.x;
  for (int64_t i0 = threadIdx.x; i0 < vocab; i0 += kLoadBatch * step) {
    float xs[kLoadBatch];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j)
      xs[j] = i0 + j * step < vocab ? to_f32(l[i0 + j * step]) : -INFINITY;
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
  block_softmax_stats(mx, s);
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

// One gradient element, (softmax - onehot) * scale with k = scale / z: the one expression every
// gradient kernel evaluates, so that the fused kernel's dlogits are the backward kernel's bits.
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
// time here too (the backward kernel's gradient loop issues one). L bf16_t (with D bf16_t): bf16
// rows too long for cross_entropy_staged_kernel's shared memory (DeepSeek-V3's 129,280 entries).
template <typename L, typename D>
__global__ void cross_entropy_fused_kernel(float* losses, D* dlogits, const L* logits,
                                           const int32_t* targets, int64_t vocab, float scale) {
  const int64_t row = blockIdx.x;
  const int32_t y = targets[row];
  D* d = dlogits + row * vocab;
  if (y < 0) {  // the whole block agrees, so no thread waits at a barrier
    if (threadIdx.x == 0) losses[row] = 0.0f;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) __stcs(d + i, from_f32<D>(0.0f));
    return;
  }
  const L* l = logits + row * vocab;
  // Read before row_softmax_stats: its barriers order this read before any thread's store, which
  // in place (d == l) overwrites l[y].
  const float target_logit = threadIdx.x == 0 ? to_f32(l[y]) : 0.0f;
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
      xs[j] = i < vocab ? to_f32(l[i]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int64_t i = g + j * step + threadIdx.x;
      if (i < vocab) __stcs(d + i, from_f32<D>(ce_grad(xs[j], m, k, i == y, scale)));
    }
  }
}

// --- bf16 logits, one read of each row

// Threads of cross_entropy_staged_kernel: a block holds a whole row in shared memory, so at
// V2-Lite's vocabulary one block fills an SM; its loads are all in flight at once (cp.async, no
// registers held), and 32 warps keep the SM busy while it computes from shared memory.
constexpr int kStagedThreads = 1024;
constexpr uint16_t kBf16NegInf = 0xff80;

// Shared bytes for a row of `vocab` bf16 logits staged at its 16-byte phase (below): up to 7
// elements of padding before the row and up to 7 after, in 16-byte chunks.
constexpr size_t staged_row_bytes(int64_t vocab) {
  return size_t((vocab + 14) / 8) * 16;
}

// Loss and bf16 gradient of a bf16 row from one read of it: the row goes from HBM to shared
// memory (cp.async, every 16-byte chunk of the row in flight at once), and the statistics, the
// loss and the gradient all read it there. Then the gradient is written, possibly over the
// logits (d == l): every load landed before the block's barrier, so no store can race one.
// Layout: row element i lives at s[i + lead], lead = the row start's offset in elements past a
// 16-byte boundary, so that shared chunk c (elements 8c - lead .. 8c - lead + 7) is one aligned
// global chunk: whole chunks travel as 16 bytes (every chunk when vocab % 8 == 0 and the tensor is
// aligned), the row's first and last chunk element by element when the row is not aligned (an odd
// vocabulary); padding is -inf, which the statistics skip and which no store writes.
// Statistics: thread t takes chunks t, t + blockDim.x, ... in that order; per chunk, the running
// max moves to the chunk's max once, then the chunk's eight exp terms are summed in float (eight
// terms: a relative error under 2^-21, against the 1e-5 loss parity) and added to the thread's
// double sum; then block_softmax_stats. The order is fixed, so the result is deterministic; it is
// not the two-pass kernel's order, so the two agree to rounding, not to the bit.
__global__ void __launch_bounds__(kStagedThreads, 1)
    cross_entropy_staged_kernel(float* losses, bf16_t* dlogits, const bf16_t* logits,
                                const int32_t* targets, int64_t vocab, float scale) {
  extern __shared__ __align__(16) uint16_t staged[];
  const int64_t row = blockIdx.x;
  const int32_t y = targets[row];
  const bf16_t* l = logits + row * vocab;
  bf16_t* d = dlogits + row * vocab;
  const int lead = int(reinterpret_cast<uintptr_t>(l) % 16 / 2);
  const int64_t chunks = (lead + vocab + 7) / 8;
  // Whether the gradient row has the logits row's phase (in place, or tensors alike): then whole
  // chunks are stored as 16 bytes too.
  const bool wide_store =
      (reinterpret_cast<uintptr_t>(d) - reinterpret_cast<uintptr_t>(l)) % 16 == 0;
  const bool ignored = y < 0;  // the whole block agrees, so no thread waits at a barrier
  float m = -INFINITY, k = 0.0f;
  if (!ignored) {
    const uint32_t s0 = shared_address(staged);
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const int64_t i0 = 8 * c - lead;
      if (i0 >= 0 && i0 + 8 <= vocab) {
        cp_async16(s0 + uint32_t(16 * c), l + i0, true);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int64_t i = i0 + j;
          staged[8 * c + j] = i >= 0 && i < vocab ? __bfloat16_as_ushort(l[i]) : kBf16NegInf;
        }
      }
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    const uint4* chunk = reinterpret_cast<const uint4*>(staged);
    double z = 0.0;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float xs[8];
      widen_bf16x8(chunk[c], xs);
      float cm = xs[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) cm = fmaxf(cm, xs[j]);
      if (cm == -INFINITY) continue;  // padding (or -inf logits) only
      if (cm > m) {
        z = m == -INFINITY ? 0.0 : z * double(expf(m - cm));
        m = cm;
      }
      float cs = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) cs += expf(xs[j] - m);  // a -inf term adds exp(-inf) = 0
      z += double(cs);
    }
    block_softmax_stats(m, z);
    if (threadIdx.x == 0) {
      const float target_logit = __bfloat162float(__ushort_as_bfloat16(staged[lead + y]));
      losses[row] = float(log(z) + double(m) - double(target_logit));
    }
    k = float(double(scale) / z);
  } else if (threadIdx.x == 0) {
    losses[row] = 0.0f;
  }
  const uint4* chunk = reinterpret_cast<const uint4*>(staged);
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const int64_t i0 = 8 * c - lead;
    float g[8];
    if (ignored) {
#pragma unroll
      for (int j = 0; j < 8; ++j) g[j] = 0.0f;
    } else {
      float xs[8];
      widen_bf16x8(chunk[c], xs);
#pragma unroll
      for (int j = 0; j < 8; ++j) g[j] = ce_grad(xs[j], m, k, i0 + j == y, scale);
    }
    if (wide_store && i0 >= 0 && i0 + 8 <= vocab) {
      __stcs(reinterpret_cast<uint4*>(d + i0),
             make_uint4(pack_bf16(g[0], g[1]), pack_bf16(g[2], g[3]), pack_bf16(g[4], g[5]),
                        pack_bf16(g[6], g[7])));
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (i0 + j >= 0 && i0 + j < vocab) __stcs(d + i0 + j, from_f32<bf16_t>(g[j]));
    }
  }
}

// Whether a row of `vocab` bf16 logits fits the staged kernel's shared memory on this device
// (227 KB on Hopper: rows up to ~116k entries; less on other GPUs), raising the kernel's limit
// past the 48 KB default when it does. Asked once per device and vocabulary (four runtime calls
// otherwise, on every 1024-row chunk of the loss).
cudaError_t staged_row_fits(int64_t vocab, bool& fits) {
  static std::mutex mu;
  static std::map<std::pair<int, int64_t>, bool> known;
  fits = false;
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = known.find({dev, vocab}); it != known.end()) {
    fits = it->second;
    return cudaSuccess;
  }
  cudaFuncAttributes attr{};
  e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, cross_entropy_staged_kernel);
  if (e != cudaSuccess) return e;
  const size_t bytes = staged_row_bytes(vocab);
  if (bytes + attr.sharedSizeBytes <= size_t(optin)) {
    // The device's whole limit (not this row's bytes), so that no vocabulary's setting can lower
    // the limit below a row that an earlier call found fitting.
    e = cudaFuncSetAttribute(cross_entropy_staged_kernel,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             optin - int(attr.sharedSizeBytes));
    if (e != cudaSuccess) return e;
    fits = true;
  }
  known[{dev, vocab}] = fits;
  return cudaSuccess;
}

}  // namespace

bool cross_entropy_stages_rows(int64_t vocab) {
  bool fits = false;
  return staged_row_fits(vocab, fits) == cudaSuccess && fits;
}

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

cudaError_t cross_entropy_fused(float* losses, void* dlogits, bool dlogits_bf16, const void* logits,
                                bool logits_bf16, const int32_t* targets, int64_t rows,
                                int64_t vocab, float scale) {
  if (rows == 0) return cudaSuccess;
  if (logits_bf16) {
    if (!dlogits_bf16) return cudaErrorInvalidValue;  // the host side checks it first
    auto* d = static_cast<bf16_t*>(dlogits);
    const auto* l = static_cast<const bf16_t*>(logits);
    bool fits = false;
    if (const cudaError_t e = staged_row_fits(vocab, fits); e != cudaSuccess) return e;
    if (fits)
      cross_entropy_staged_kernel<<<unsigned(rows), kStagedThreads, staged_row_bytes(vocab),
                                    stream()>>>(losses, d, l, targets, vocab, scale);
    else
      cross_entropy_fused_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(losses, d, l, targets,
                                                                            vocab, scale);
    return cudaGetLastError();
  }
  const auto* l = static_cast<const float*>(logits);
  if (dlogits_bf16)
    cross_entropy_fused_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
        losses, static_cast<bf16_t*>(dlogits), l, targets, vocab, scale);
  else
    cross_entropy_fused_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
        losses, static_cast<float*>(dlogits), l, targets, vocab, scale);
  return cudaGetLastError();
}

}  // namespace moekit::cuda
