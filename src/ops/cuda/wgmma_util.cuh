// Warpgroup-level tensor-core helpers for Hopper (sm_90a): the wgmma.mma_async instructions the
// flash-attention forward uses (cuda_flash_attention_hopper.cu), their shared-memory matrix
// descriptors, and the fences and waits around them. mma.sync (mma_util.cuh) runs at about two
// thirds of the H100/H200 tensor-core rate and needs every operand fragment loaded into registers
// by ldmatrix; wgmma reads B (and A, or takes it from registers) straight from shared memory in a
// 128-byte-swizzled layout and issues asynchronously, so one warpgroup (4 warps, 64 rows) can
// keep the tensor cores busy while the others run their softmax.
//
// Compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the callers guard on it.
#pragma once

#include <cstdint>

#include "ops/cuda/mma_util.cuh"

namespace moekit::cuda {

// Shared-memory tiles for wgmma use the 128-byte swizzle: a tile is stored as blocks of 64 bf16
// columns (128-byte rows), each block [rows][64] with row r's 16-byte piece c at byte
// r * 128 + ((c ^ (r % 8)) * 16). Blocks start on 1024-byte boundaries (the swizzle repeats every
// 8 rows and is applied to the address bits, so a descriptor may start 32 bytes into a row for
// the next k-step of 16 columns).
__device__ inline uint32_t swizzle128(int row, int piece) {
  return uint32_t(row * 128 + ((piece ^ (row & 7)) << 4));
}

// A shared-memory matrix descriptor: start address, leading and stride byte offsets (all in
// 16-byte units, 14 bits each), 128-byte swizzle (mode 1 in bits 62-63).
//  K-major operand (rows = M or N, 64 contiguous k per 128-byte row): the stride offset is the
//    distance between 8-row groups (1024 bytes in a dense block); the leading offset is unused.
//  MN-major operand (rows = k, 64 contiguous n per 128-byte row; V in P V): the stride offset is
//    the distance between groups of 8 k-rows (1024), the leading offset the distance between
//    64-column blocks along n.
__device__ inline uint64_t wgmma_desc(uint32_t smem_addr, uint32_t leading, uint32_t stride) {
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t((leading >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// Orders this thread's register writes (accumulators, A fragments) before the next wgmma reads
// them; required before the first wgmma of a batch.
__device__ inline void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ inline void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed wgmma groups of this warpgroup are unfinished (the newest N).
template <int N>
__device__ inline void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ inline void wgmma_wait_all() {
  wgmma_wait<0>();
}
// Makes shared-memory writes of the generic proxy (st.shared, cp.async) visible to the async
// proxy that wgmma reads through; each writing thread runs it before the barrier.
__device__ inline void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator across the asynchronous
// wgmma that owns it (the asm statements of the instructions only name it at issue).
template <int N>
__device__ inline void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for A fragments in registers, which wgmma reads asynchronously too: kept live (their
// registers not reused) until after the wait.
template <int N>
__device__ inline void wgmma_fence_operands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// Register layout of a m64nNk16 fp32 accumulator d[N / 2]: warp w of the warpgroup holds rows
// 16w + g (d[4j], d[4j + 1]) and 16w + g + 8 (d[4j + 2], d[4j + 3]) at columns 8j + 2t, +1, with
// g = lane / 4, t = lane % 4: per 8 columns the m16n8 accumulator of mma.sync.

// d (+)= A B, m64n32k16: A and B from shared memory (descriptors), both K-major.
__device__ inline void wgmma_ss_n32(float (&d)[16], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d (+)= A B, m64n64k16: A and B from shared memory (descriptors), both K-major.
__device__ inline void wgmma_ss_n64(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d += A B, m64n64k16: A from registers (the m16n8k16 A fragment of the warp's 16 rows),
// B from shared memory, MN-major (transposed: B stored [k][n]).
__device__ inline void wgmma_rs_n64_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// d (+)= A B, m64n128k16: A and B from shared memory (descriptors), both K-major.
__device__ inline void wgmma_ss_n128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, "
      "%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d (+)= A B, m64n256k16: A and B from shared memory (descriptors), both K-major. The widest
// instruction: it reads the 64 x 16 A slice once for 256 columns (two n128 read it twice), which
// the expert GEMM (cuda_expert_gemm.cu) needs to stay under the shared-memory bandwidth.
__device__ inline void wgmma_ss_n256(float (&d)[128], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
      "%127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d += A B, m64n128k16: A from registers (the m16n8k16 A fragment of the warp's 16 rows),
// B from shared memory, MN-major (transposed: B stored [k][n]).
__device__ inline void wgmma_rs_n128_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, "
      "%63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// The instruction for N columns (32, 64 or 128; 64 or 128 from registers).
template <int N>
__device__ inline void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  static_assert(N == 32 || N == 64 || N == 128);
  if constexpr (N == 32)
    wgmma_ss_n32(d, a, b, accumulate);
  else if constexpr (N == 64)
    wgmma_ss_n64(d, a, b, accumulate);
  else
    wgmma_ss_n128(d, a, b, accumulate);
}
template <int N>
__device__ inline void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  static_assert(N == 64 || N == 128);
  if constexpr (N == 64)
    wgmma_rs_n64_tb(d, a, b);
  else
    wgmma_rs_n128_tb(d, a, b);
}

// acc (+)= A B^T over K / 16 k-steps, A and B K-major 128-byte-swizzled tiles in shared memory:
// A of 64 rows (a: its first row; a_block: bytes between its 64-column blocks, 128 x its rows),
// B of N rows likewise. The first k-step overwrites acc. A k-step of 16 columns is 32 bytes into
// a 128-byte row, four k-steps per block.
template <int N, int K>
__device__ inline void wgmma_tiles(float (&acc)[N / 2], uint32_t a, uint32_t a_block, uint32_t b,
                                   uint32_t b_block) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const uint32_t col = kk / 4, in_row = (kk % 4) * 32;  // 64-column block; bytes into it
    wgmma_ss<N>(acc, wgmma_desc(a + col * a_block + in_row, 16, 1024),
                wgmma_desc(b + col * b_block + in_row, 16, 1024), kk > 0);
  }
}

// acc += P B over K / 16 k-steps: P the A fragments in registers (acc's 64 rows x K; fragment kk
// covers k = 16kk..16kk + 15), B a [K rows][N columns] MN-major swizzled tile (b: its first row;
// b_block: bytes between its 64-column blocks along N, 128 x its rows). A k-step is 16 rows
// (2048 bytes) on. N = 192 runs as n128 then n64: the first 64 and the last 32 registers of a
// m64n192 accumulator are those two instructions' layouts (8-column groups 0-15 and 16-23).
template <int N, int K>
__device__ inline void wgmma_regs_mn(float (&acc)[N / 2], const uint32_t (&p)[K / 16][4],
                                     uint32_t b, uint32_t b_block) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const uint32_t bk = b + kk * 16 * 128;
    if constexpr (N == 192) {
      wgmma_rs_tb<128>(reinterpret_cast<float(&)[64]>(acc[0]), p[kk],
                       wgmma_desc(bk, b_block, 1024));
      wgmma_rs_tb<64>(reinterpret_cast<float(&)[32]>(acc[64]), p[kk],
                      wgmma_desc(bk + 2 * b_block, b_block, 1024));
    } else {
      wgmma_rs_tb<N>(acc, p[kk], wgmma_desc(bk, b_block, 1024));
    }
  }
}

// Copies rows [row0, row0 + R) of a [rows, stride] bf16 matrix (`head` at row 0, `valid` rows,
// `pieces` 16-byte pieces per row holding data) into a swizzled shared tile of R rows and P pieces
// per row (P / 8 blocks of 64 columns, `block_bytes` apart), zeros past either (cp.async, one
// commit group is the caller's). Thread tid takes piece tid % 8 of each 64-column block in rows
// tid / 8 + k * (Threads / 8): eight threads read one row's 128 contiguous bytes, and the row's
// swizzle (row % 8) is the same in every pass, so all addresses are the thread's base plus
// compile-time offsets (a cp.async costs a few instructions instead of the ~30 a general index
// split took; the loads were most of the forward kernel's instructions).
template <int R, int P, int Threads>
__device__ inline void load_swizzled(uint32_t dst, uint32_t block_bytes, const uint16_t* head,
                                     int64_t stride, int row0, int valid, int pieces, int tid) {
  static_assert(Threads % 64 == 0 && P % 8 == 0);
  constexpr int kRowsPerPass = Threads / 8;  // a multiple of 8: the swizzle repeats
  const int c = tid % 8, rq = tid / 8;
  const uint32_t sm = dst + uint32_t(rq * 128) + (uint32_t(c ^ (rq & 7)) << 4);
  const uint16_t* const src = head + int64_t(row0 + rq) * stride + c * 8;
  const int64_t pass_stride = int64_t(kRowsPerPass) * stride;
#pragma unroll
  for (int pass = 0; pass < (R + kRowsPerPass - 1) / kRowsPerPass; ++pass) {
    const int r = rq + pass * kRowsPerPass;
    if (R % kRowsPerPass != 0 && r >= R) break;
    const bool row_in = row0 + r < valid;
#pragma unroll
    for (int blk = 0; blk < P / 8; ++blk) {
      const bool in = row_in && blk * 8 + c < pieces;
      cp_async16(sm + blk * block_bytes + pass * kRowsPerPass * 128,
                 in ? src + pass * pass_stride + blk * 64 : head, in);
    }
  }
}

}  // namespace moekit::cuda
