// Warp-level tensor-core helpers shared by the fused flash-attention kernels (forward:
// cuda_flash_attention.cu, backward: cuda_flash_attention_bwd.cu): asynchronous global -> shared
// copies (also the loss's row staging, cuda_loss.cu), ldmatrix, the bf16 mma.sync m16n8k16 and the
// lane offsets that make ldmatrix deliver mma fragments. Inline PTX, sm_80 and later (Hopper runs
// these at mma.sync rates, not wgmma's).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"

namespace moekit::cuda {

// bf16 elements of padding per shared row: a row stride of D + 8 (D a multiple of 64) is 4 mod 32
// banks, so the 8 rows of 16 bytes that one ldmatrix phase reads fall on distinct banks.
constexpr int kPad = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ inline uint32_t shared_address(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; valid = false writes 16 zero bytes (src unread).
__device__ inline void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
// 4 bytes (one float) global -> shared, asynchronously; valid = false writes zero.
__device__ inline void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
__device__ inline void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N committed groups (the newest N) are still in flight.
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// The two counts most loops use: the newest group may still be in flight; every group landed.
__device__ inline void cp_async_wait_one() {
  cp_async_wait<1>();
}
__device__ inline void cp_async_wait_all() {
  cp_async_wait<0>();
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, r[i] receives its
// fragment: row lane/4, columns 2(lane%4), +1 (with .trans: column lane/4, rows 2(lane%4), +1).
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += A B, m16n8k16, A row-major 16x16 bf16, B column-major 16x8 bf16, fp32 accumulators.
// With g = lane / 4, t = lane % 4 (each 32-bit register holds two bf16, lower column in the low
// half):  a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..];
// b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g];  d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..].
__device__ inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Max and sum over the 4 lanes of a quad (lanes 4g..4g+3 hold the columns of rows g,
// g + 8 of an mma accumulator).
__device__ inline float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ inline float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// 2^x on the special-function unit alone (ex2.approx.ftz: relative error ~2^-22, subnormal results
// flushed to zero), one instruction where exp2f adds range handling around it; for softmax
// weights that are rounded to bf16 (8 bits) next.
__device__ inline float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Per-lane ldmatrix_x4 offsets (elements) into a row-major shared block with row stride `stride`,
// matrix i = lane / 8 and its row lane % 8.
//
// frag_rows_offset: matrix 0 = rows +0..7 x cols +0..7, 1 = rows +8..15 x cols +0..7, 2 = rows
// +0..7 x cols +8..15, 3 = rows +8..15 x cols +8..15. Non-transposed at a 16x16 block of A
// (rows = the mma's rows, cols = k) it gives the A fragment a[0..3]. Transposed (.trans) at a
// block of B stored k-major (rows = k, cols = n, as V in P V) it gives b0, b1 of n-tile 2p in
// r[0], r[1] and of n-tile 2p + 1 in r[2], r[3].
__device__ inline int frag_rows_offset(int lane, int stride) {
  const int mi = lane / 8, mr = lane % 8;
  return (mr + ((mi & 1) ? 8 : 0)) * stride + ((mi & 2) ? 8 : 0);
}
// frag_cols_offset: matrix 0 = rows +0..7 x cols +0..7, 1 = rows +0..7 x cols +8..15, 2 = rows
// +8..15 x cols +0..7, 3 = rows +8..15 x cols +8..15. Non-transposed at a block of B stored
// n-major (rows = n, cols = k, as K in Q K^T) it gives b0, b1 of n-tile 2p (rows +0..7) in r[0],
// r[1] and of n-tile 2p + 1 (rows +8..15) in r[2], r[3].
__device__ inline int frag_cols_offset(int lane, int stride) {
  const int mi = lane / 8, mr = lane % 8;
  return (mr + ((mi & 2) ? 8 : 0)) * stride + ((mi & 1) ? 8 : 0);
}

}  // namespace moekit::cuda
