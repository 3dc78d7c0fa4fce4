// CUDA kernels: few-row GEMMs against a weight matrix, c = alpha * a @ W^T + beta * c with a of at
// most kGemvMaxRows rows (decoding one or a few tokens). Such a GEMM reads the whole weight once
// and does two FLOPs per weight per row: it is bound by memory, and cuBLAS's tensor-core GEMMs
// (which also need the activations rounded to bf16 first, one more launch) waste their setup on
// it. One warp per weight row reads it once with 16-byte loads and dots it with every row of a
// (warp_dots.cuh), in fp32, deterministically. Dependent launches (dependent_launch.cuh).
#include <type_traits>

#include "ops/cuda/dependent_launch.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/warp_dots.cuh"

namespace moekit::cuda {

namespace {

// R: the rows of `a` this instance handles (M <= R): a one-row GEMV keeps no registers for rows it
// does not have, so warp_dots can keep more of its weight loads in flight.
template <typename W, int R>
__global__ void gemv_kernel(float* c, const float* a, const W* w, int64_t M, int64_t N, int64_t K,
                            int64_t lda, int64_t ldw, int64_t ldc, float alpha, float beta) {
  allow_dependents();
  const int64_t n = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  if (n >= N) return;  // whole warps: n is the same in every lane
  wait_for_inputs();
  const W* wr[R];
  const float* ar[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    wr[r] = w + n * ldw;
    ar[r] = a + (r < M ? r : 0) * lda;
  }
  float acc[R];
  warp_dots<W, R>(acc, wr, ar, int(M), K);
  if ((threadIdx.x & 31) != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= M) continue;
    float* out = c + r * ldc + n;
    *out = beta == 0.0f ? alpha * acc[r] : alpha * acc[r] + beta * *out;
  }
}

// One row of `a` against a bf16 weight whose rows fit in registers (K <= P * 256): each warp loads
// its whole weight row BEFORE waiting for the kernel before it (dependent_launch.cuh), so the
// weight's memory round trip overlaps that kernel and, after the wait, only the activations (L2)
// remain. A decode step's GEMVs were one DRAM round trip each after their predecessor ended
// (~30 % of the bandwidth). Safe because nothing that may still run then writes a BF16 weight:
// kernels that let dependents start early write fp32 only, and every other kernel has finished
// before its successor starts. Same products and summation order as warp_dots<uint16_t, 1>.
template <int P>
__global__ void gemv_preload_kernel(float* c, const float* a, const uint16_t* w, int64_t N,
                                    int64_t K, int64_t ldw, float alpha, float beta) {
  allow_dependents();
  const int64_t n = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  if (n >= N) return;  // whole warps
  const int lane = int(threadIdx.x) & 31;
  const int64_t chunks = K / 8;  // 16-byte chunks of 8 bf16; K % 8 == 0 (the launch checks)
  const uint16_t* row = w + n * ldw;
  uint4 raw[P];
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int64_t ch = lane + 32 * i;
    if (ch < chunks) raw[i] = *reinterpret_cast<const uint4*>(row + ch * 8);
  }
  wait_for_inputs();
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int64_t ch = lane + 32 * i;
    if (ch >= chunks) continue;
    float wv[8], av[8];
    Chunk<uint16_t>::widen(raw[i], wv);
    Chunk<float>::load(a + ch * 8, av);
    Chunk<float>::load(a + ch * 8 + 4, av + 4);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc = fmaf(wv[j], av[j], acc);
  }
  acc = warp_reduce(acc, Sum{});
  if (lane == 0) c[n] = beta == 0.0f ? alpha * acc : alpha * acc + beta * c[n];
}

// One row of `a` against a short weight (few output rows N, e.g. the router's 64): a warp per
// weight row would leave most of the GPU idle and each warp waiting on its long row, so here a
// block takes one weight row and its kSplitWarps warps take a slice of K each; the slices' sums
// are added in warp order (deterministic). Measured before it (H200, batch-1 decode): the fp32
// router GEMV, 64 x 2048, took 7.2 us.
constexpr int kSplitWarps = 8;
template <typename W>
__global__ void gemv_split_k_kernel(float* c, const float* a, const W* w, int64_t K, int64_t ldw,
                                    int64_t slice, float alpha, float beta) {
  __shared__ float partial[kSplitWarps];
  allow_dependents();
  const int64_t n = blockIdx.x;
  const int warp = int(threadIdx.x) >> 5;
  const int64_t k0 = warp * slice, len = k0 < K ? (K - k0 < slice ? K - k0 : slice) : 0;
  wait_for_inputs();
  const W* wr[1] = {w + n * ldw + k0};
  const float* ar[1] = {a + k0};
  float acc[1] = {0.0f};
  if (len > 0) warp_dots<W, 1>(acc, wr, ar, 1, len);
  if ((threadIdx.x & 31) == 0) partial[warp] = acc[0];
  __syncthreads();
  if (threadIdx.x != 0) return;
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kSplitWarps; ++i) sum += partial[i];
  c[n] = beta == 0.0f ? alpha * sum : alpha * sum + beta * c[n];
}

template <typename W>
cudaError_t launch_gemv(float* c, const float* a, const W* w, int64_t M, int64_t N, int64_t K,
                        int64_t lda, int64_t ldw, int64_t ldc, float alpha, float beta) {
  constexpr int kThreadsPerBlock = 256;  // 8 warps, one weight row each
  const unsigned blocks = unsigned((N * 32 + kThreadsPerBlock - 1) / kThreadsPerBlock);
  if constexpr (std::is_same_v<W, uint16_t>) {
    const bool aligned = reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(a) % 16 == 0 && ldw % 8 == 0 && K % 8 == 0;
    if (M == 1 && aligned && K > 0 && K <= 16 * 256)
      return launch_dependent(K <= 8 * 256 ? gemv_preload_kernel<8> : gemv_preload_kernel<16>,
                              dim3(blocks), dim3(kThreadsPerBlock), c, a, w, N, K, ldw, alpha,
                              beta);
  }
  if (M == 1 && N < 1024 && K >= 1024) {  // few, long weight rows: split each over a block
    // Slices of a multiple of 64 elements keep every slice's start 16-byte aligned.
    const int64_t slice = ((K + kSplitWarps - 1) / kSplitWarps + 63) / 64 * 64;
    return launch_dependent(gemv_split_k_kernel<W>, dim3(unsigned(N)), dim3(kSplitWarps * 32), c, a,
                            w, K, ldw, slice, alpha, beta);
  }
  auto* kernel =
      M == 1 ? gemv_kernel<W, 1> : (M == 2 ? gemv_kernel<W, 2> : gemv_kernel<W, kGemvMaxRows>);
  return launch_dependent(kernel, dim3(blocks), dim3(kThreadsPerBlock), c, a, w, M, N, K, lda, ldw,
                          ldc, alpha, beta);
}

}  // namespace

cudaError_t gemv(float* c, const float* a, const void* w, bool w_bf16, int64_t M, int64_t N,
                 int64_t K, int64_t lda, int64_t ldw, int64_t ldc, float alpha, float beta) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > kGemvMaxRows) return cudaErrorInvalidValue;
  return w_bf16
             ? launch_gemv(c, a, static_cast<const uint16_t*>(w), M, N, K, lda, ldw, ldc, alpha,
                           beta)
             : launch_gemv(c, a, static_cast<const float*>(w), M, N, K, lda, ldw, ldc, alpha, beta);
}

}  // namespace moekit::cuda
