// CUDA kernels, part 5d: the causal attention backward of Precision::Bf16 as two fused kernels on
// the bf16 tensor cores (the forward: cuda_flash_attention.cu; host side: cuda_attention_tc.cpp,
// which keeps the cuBLAS path of cuda_attention_tc.cu as the fallback). The GEMM path writes fp32
// S and dP for every score to memory and runs five GEMMs around a row kernel; here a 64 x 64 block
// of scores is recomputed in registers from the saved lse and consumed in shared memory.
//
// Numerics, as the GEMM path: q, k, v, dO bf16 (rounded once by the caller), S = Q K^T and
// dP = dO V^T with fp32 accumulation, P = exp(scale S - lse) in fp32 (as exp2 of scores scaled by
// scale * log2(e), the forward's base), dS = P * (dP - delta) * scale with delta = rowsum(dO * O)
// from attention_delta (fp32, unrounded dO, O as stored); P and dS rounded to bf16 as the A
// operands of dV = P^T dO, dK = dS^T Q and dQ = dS K, accumulated in fp32.
//
// Deterministic without atomics: dK and dV are owned by the block of their key tile, which sums
// the query tiles in order; dQ is owned by a second kernel's block of its query tile, which sums
// the key tiles in order. The price is S and dP computed twice (FLOPs 3 dqk + 2 dv -> 4 dqk + 3 dv
// per score: 1.38x at dqk 192, dv 128); a single pass would have to add dQ across blocks.
//
// Both kernels: 8 warps over a 64 x 64 block of scores. Warp w owns 16 rows (w % 4) and, for the
// scores, 32 columns (w / 4): it computes its 16 x 32 of S and dP, turns them into P and dS and
// writes them to shared memory as bf16. After a barrier it multiplies all 64 columns of its 16
// rows by the next operand, for half of that operand's columns (w / 4): the accumulators of a
// warp are (dqk + dv) / 2 columns wide in the dK/dV kernel and dqk / 2 in the dQ kernel, at most
// 128 fp32 registers per lane at 256/256, and no score is computed twice within a kernel.
//  - dK/dV kernel, block (key tile, head, sequence), tile 0 (the most query tiles) first: keys,
//    their K and V rows resident in shared memory, are the rows (S^T = K Q^T, dP^T = V dO^T);
//    query tiles kt.. (causal) stream through double-buffered Q, dO, lse and delta (cp.async).
//  - dQ kernel, block (query tile, head, sequence), the last tile (the most key tiles) first:
//    queries, Q and dO resident, are the rows; key tiles 0..qt stream through K and V buffers.
// Only tiles that reach past the block's first query are masked; rows past the sequence's end are
// staged as zeros (cp.async zero fill) and their P and dS set to zero, so they add nothing.
//
// Variants (MOEKIT_FLASH_BWD_VARIANT, read per call): 0-4 are these kernels' (kBwdVariants), 5-7
// the wgmma kernels of cuda_flash_attention_hopper_bwd.cu (its tilings 0-2). Unset or out of
// range: 5 where the build, the device and the head dims have the Hopper kernels, else 1 (the
// fastest of these). Each is deterministic. Variants 0-4 add the same products in the same order
// for each gradient element (m-tiles and register-held fragments change who loads what, not the
// sums), so they are expected to give variant 0's bits (not asserted: the compiler may contract
// differently).
// Registers at 192/128 (ptxas, sm_90), dK/dV kernel / dQ kernel:
//  0  the original kernels: 168 / 134 registers, 148 / 138 KB shared, 8 warps per SM each.
//  1  dQ kernel with 32 query rows per warp (128 per block): one ldmatrix of K or V feeds two
//     m-tiles, ldmatrix per mma 3/4 -> 1/2 in the scores and 7/12 -> 1/3 in dS K; half the dQ
//     blocks, each streaming K/V once for twice the rows. 168 / 221 registers, dQ 186 KB.
//  2  A fragments in registers: K in the dK/dV kernel (S^T = K Q^T reads only Q per k-step), Q
//     and dO in the dQ kernel; 216 / 228 registers (not at 256/256: they spilled; variant 0 there).
//  3  1 and 2 combined (K in registers for dK/dV; the 32-row dQ kernel): 216 / 221 registers.
//  4  dQ kernel single-buffered (95 KB) and capped at 128 registers (uses 125): 2 blocks, 16 warps
//     per SM, the other block's work hiding each block's loads.
// dq_mt 2 does not fit at 256/256 (288 KB): there the original dQ kernel runs.
#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_args.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/mma_util.cuh"

namespace moekit::cuda {

namespace {

constexpr int kTile = 64;  // keys per key tile, queries per query tile (times dq_mt in dQ)
constexpr int kWarps = 8;  // 4 row groups of 16 (x dq_mt) x 2 column halves
constexpr int kBwdThreads = kWarps * 32;
constexpr int sStride = kTile + kPad;  // row stride of the bf16 P / dS tiles in shared memory

// A tiling/scheduling choice of the two kernels (the variants of the header).
struct BwdCfg {
  int kv_regs;    // dK/dV kernel: 0, 1 (K) or 2 (K and V) A fragments held in registers
  bool qdo_regs;  // dQ kernel: Q and dO A fragments held in registers (dq_mt 1 only)
  int dq_mt;      // dQ kernel: m-tiles of 16 rows per warp (1 or 2: 64 or 128 queries per block)
  int dq_stages;  // dQ kernel: K/V buffers (2; 1 with 2 blocks per SM)
};
constexpr BwdCfg kBwdVariants[] = {
    {0, false, 1, 2},  // 0: the original kernels
    {0, false, 2, 2},  // 1: dQ kernel with 32 query rows per warp
    {1, true, 1, 2},   // 2: A fragments in registers (K in dK/dV, Q and dO in dQ)
    {1, false, 2, 2},  // 3: 1 and 2 combined
    {0, false, 1, 1},  // 4: dQ kernel single-buffered, 2 blocks per SM
};
constexpr int kBwdVariantCount = int(sizeof(kBwdVariants) / sizeof(kBwdVariants[0]));

// Stages rows r0..r0+Rows-1 of head h of a bf16 [tokens, heads, dim] tensor (token tok0 + row)
// into shared memory at dst (row stride `stride` elements): rows past `seq` are zero (their src
// is never read), columns past dim are left alone (no k-step or n-tile reads them). Thread tid
// takes piece tid % 8 of each 64-column block in rows tid / 8 + k * (threads / 8): eight threads
// read one row's 128 contiguous bytes, and every address is the thread's base plus compile-time
// offsets (a general split of the piece index divided by the runtime piece count per copy, ~30
// integer instructions, as many as the copy's share of the math).
template <int Stride, int Rows = kTile>
__device__ inline void stage_rows(uint16_t* dst, const uint16_t* src, int64_t tok0, int r0, int seq,
                                  int heads, int h, int dim) {
  constexpr int kRowsPerPass = kBwdThreads / 8, kBlocks = (Stride - kPad) / 64;
  static_assert(kBwdThreads % 8 == 0 && Rows % kRowsPerPass == 0 && (Stride - kPad) % 64 == 0);
  const int pieces = dim / 8;  // 16-byte pieces per row holding data
  const int c = int(threadIdx.x) % 8, rq = int(threadIdx.x) / 8;
  const uint32_t d = shared_address(dst) + uint32_t((rq * Stride + c * 8) * 2);
  const int64_t row_stride = int64_t(heads) * dim;
  const uint16_t* const s0 = src + ((tok0 + r0 + rq) * heads + h) * dim + c * 8;
#pragma unroll
  for (int pass = 0; pass < Rows / kRowsPerPass; ++pass) {
    const bool row_in = r0 + rq + pass * kRowsPerPass < seq;
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) {
      if (blk * 8 + c >= pieces) continue;
      cp_async16(d + uint32_t((pass * kRowsPerPass * Stride + blk * 64) * 2),
                 row_in ? s0 + pass * kRowsPerPass * row_stride + blk * 64 : src, row_in);
    }
  }
}

// lse and delta of rows r0..r0+63 of one (sequence, head) row of the statistics into dst[0..63]
// and dst[64..127] (zero past seq).
__device__ inline void stage_stats(float* dst, const float* lse, const float* delta, int r0,
                                   int seq) {
  for (int i = int(threadIdx.x); i < 2 * kTile; i += kBwdThreads) {
    const int r = i % kTile, j = r0 + r;
    const float* src = (i < kTile ? lse : delta) + (j < seq ? j : 0);
    cp_async4(shared_address(dst + i), src, j < seq);
  }
}

// acc = X Y^T for the warp's 16 MT rows of X and 32 rows of Y, both row-major bf16 in shared
// memory, over `dim` (a multiple of 16; k-steps past it skipped). afrag(i, kk, r) delivers the A
// fragment of m-tile i (rows 16i..16i+15) at k-step kk (from shared memory or registers); y: Y's
// 32-row block plus frag_cols_offset (a shared address). Element (row 16i + g (+8), column
// 8nt + 2t (+1)) lands in acc[i][nt][0..1] ([2..3]). One ldmatrix of Y feeds MT m-tiles: the
// shared-memory traffic per mma falls with MT.
template <int MT, int Steps, int YStride, class AFrag>
__device__ inline void scores_x32(float (&acc)[MT][4][4], const AFrag& afrag, uint32_t y, int dim) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      acc[i][nt][0] = acc[i][nt][1] = acc[i][nt][2] = acc[i][nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < Steps; ++kk) {
    if (kk * 16 >= dim) continue;
    uint32_t xa[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) afrag(i, kk, xa[i]);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      uint32_t yb[4];
      ldmatrix_x4(yb, y + uint32_t((16 * p * YStride + 16 * kk) * 2));
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        mma_bf16(acc[i][2 * p], xa[i], yb[0], yb[1]);
        mma_bf16(acc[i][2 * p + 1], xa[i], yb[2], yb[3]);
      }
    }
  }
}

// A fragments from a row-major bf16 block in shared memory: x = the warp's first row plus the
// lane's frag_rows_offset (a shared address), row stride XStride.
template <int XStride>
struct SharedFrag {
  uint32_t x;
  __device__ void operator()(int i, int kk, uint32_t (&r)[4]) const {
    ldmatrix_x4(r, x + uint32_t((16 * i * XStride + 16 * kk) * 2));
  }
};
// A fragments held in registers (m-tile 0 only).
template <int Steps>
struct RegFrag {
  const uint32_t (&f)[Steps][4];
  __device__ void operator()(int, int kk, uint32_t (&r)[4]) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) r[j] = f[kk][j];
  }
};
// Loads the A fragments of all k-steps below dim (zero past it) into registers.
template <int Steps, int XStride>
__device__ inline void load_frags(uint32_t (&f)[Steps][4], uint32_t x, int dim) {
#pragma unroll
  for (int kk = 0; kk < Steps; ++kk) {
    if (kk * 16 < dim)
      ldmatrix_x4(f[kk], x + uint32_t(kk * 16 * 2));
    else
      f[kk][0] = f[kk][1] = f[kk][2] = f[kk][3] = 0u;
  }
}

// The warp's 16 MT x 32 block in scores_x32's layout, rounded to bf16, into a shared tile of row
// stride sStride at dst (the block's first element). One 32-bit store per pair: a row stride of
// 36 words puts the 8 rows x 4 words of one store on distinct banks.
template <int MT>
__device__ inline void store_x32(uint16_t* dst, const float (&x)[MT][4][4], int g, int t) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      *reinterpret_cast<uint32_t*>(dst + (16 * i + g) * sStride + 8 * nt + 2 * t) =
          pack_bf16(x[i][nt][0], x[i][nt][1]);
      *reinterpret_cast<uint32_t*>(dst + (16 * i + g + 8) * sStride + 8 * nt + 2 * t) =
          pack_bf16(x[i][nt][2], x[i][nt][3]);
    }
}

// acc += T Z for the warp's 16 MT rows of T (bf16 [rows, 64], row stride sStride, in shared
// memory) and Z (bf16 [64, columns] row-major in shared memory): a: T's first row of the warp
// plus frag_rows_offset; z: Z's first column of the warp plus frag_rows_offset. acc[i][n] holds
// rows 16i.. and columns 8n..8n+7 of the warp's; pairs of n-tiles at or past `cols` are skipped
// (cols a multiple of 16, possibly <= 0). One ldmatrix of Z feeds MT m-tiles.
template <int MT, int NT, int ZStride>
__device__ inline void accumulate_x64(float (&acc)[MT][NT][4], uint32_t a, uint32_t z, int cols) {
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    uint32_t ta[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) ldmatrix_x4(ta[i], a + uint32_t((16 * i * sStride + kk * 16) * 2));
#pragma unroll
    for (int p = 0; p < NT / 2; ++p) {
      if (p * 16 >= cols) continue;
      uint32_t zb[4];
      ldmatrix_x4_trans(zb, z + uint32_t((16 * kk * ZStride + 16 * p) * 2));
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        mma_bf16(acc[i][2 * p], ta[i], zb[0], zb[1]);
        mma_bf16(acc[i][2 * p + 1], ta[i], zb[2], zb[3]);
      }
    }
  }
}

template <int MT, int NT>
__device__ inline void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.0f;
}

// Writes acc (m-tile i: rows row0 + 16i = the lane's row g, +8; columns c0 + 8n + 2t, +1) into
// head h of a fp32 [tokens, heads, dim] tensor: rows below seq, columns below dim.
template <int MT, int NT>
__device__ inline void store_rows(float* out, const float (&acc)[MT][NT][4], int64_t tok0, int row0,
                                  int seq, int heads, int h, int dim, int c0, int t) {
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int r0 = row0 + 16 * i, r1 = r0 + 8;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int col = c0 + n * 8 + 2 * t;
      if (col >= dim) continue;
      if (r0 < seq)
        *reinterpret_cast<float2*>(out + ((tok0 + r0) * heads + h) * dim + col) =
            make_float2(acc[i][n][0], acc[i][n][1]);
      if (r1 < seq)
        *reinterpret_cast<float2*>(out + ((tok0 + r1) * heads + h) * dim + col) =
            make_float2(acc[i][n][2], acc[i][n][3]);
    }
  }
}

// QK: dqk rounded up to a multiple of 64, VD: dv rounded up likewise (shared widths; each warp's
// half of the dK and dV columns is QK / 2 and VD / 2 wide).
template <int QK, int VD>
constexpr size_t dkdv_smem_bytes() {
  return size_t(kTile) * (3 * (QK + kPad) + 3 * (VD + kPad) + 2 * sStride) * sizeof(uint16_t) +
         size_t(2) * 2 * kTile * sizeof(float);
}
// The dQ kernel's: its 64 MT queries' Q, dO and dS, `stages` buffers of K and V.
template <int QK, int VD, int MT, int Stages>
constexpr size_t dq_smem_bytes() {
  return (size_t(kTile) * MT * ((QK + kPad) + (VD + kPad) + sStride) +
          size_t(Stages) * kTile * ((QK + kPad) + (VD + kPad))) *
         sizeof(uint16_t);
}
constexpr size_t kMaxSmem = 227 * 1024;  // sm_90's opt-in shared memory per block

// The variant's configuration at an instance: where its dQ kernel would not fit in shared memory
// (dq_mt 2 at 256/256), the original dQ kernel; at 256/256 no fragments in registers (they
// spilled there).
template <int QK, int VD, int V>
constexpr BwdCfg bwd_cfg() {
  BwdCfg c = kBwdVariants[V];
  if (QK + VD > 320) {
    c.kv_regs = 0;
    c.qdo_regs = false;
  }
  if ((c.dq_mt == 2 ? dq_smem_bytes<QK, VD, 2, 2>() : dq_smem_bytes<QK, VD, 1, 2>()) > kMaxSmem) {
    c.dq_mt = 1;
    c.qdo_regs = false;
    c.dq_stages = 2;
  }
  return c;
}

template <int QK, int VD, int V>
__global__ void __launch_bounds__(kBwdThreads, 1) flash_dkdv_kernel(const FlashBwdArgs a) {
  constexpr BwdCfg C = bwd_cfg<QK, VD, V>();
  constexpr int qStride = QK + kPad, vStride = VD + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* const k_s = smem;                        // [64][qStride], the block's keys
  uint16_t* const v_s = k_s + kTile * qStride;       // [64][vStride]
  uint16_t* const q_s = v_s + kTile * vStride;       // 2 x [64][qStride], query tile buffers
  uint16_t* const do_s = q_s + 2 * kTile * qStride;  // 2 x [64][vStride]
  uint16_t* const p_s = do_s + 2 * kTile * vStride;  // [64][sStride]: P^T, keys x queries
  uint16_t* const ds_s = p_s + kTile * sStride;      // [64][sStride]: dS^T
  float* const stat_s = reinterpret_cast<float*>(ds_s + kTile * sStride);  // 2 x (lse, delta)

  const int kt = int(blockIdx.x), h = int(blockIdx.y), b = int(blockIdx.z);
  const int seq = a.seq, H = a.heads, dqk = a.dqk, dv = a.dvd;
  const int tiles = (seq + kTile - 1) / kTile;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4, w4 = warp % 4, half = warp / 4;
  const int64_t tok0 = int64_t(b) * seq;
  const float* const lse = a.lse + (int64_t(b) * H + h) * seq;
  const float* const delta = a.delta + (int64_t(b) * H + h) * seq;

  auto load_queries = [&](int qt, int buf) {
    stage_rows<qStride>(q_s + buf * kTile * qStride, a.q, tok0, qt * kTile, seq, H, h, dqk);
    stage_rows<vStride>(do_s + buf * kTile * vStride, a.dout, tok0, qt * kTile, seq, H, h, dv);
    stage_stats(stat_s + buf * 2 * kTile, lse, delta, qt * kTile, seq);
  };
  stage_rows<qStride>(k_s, a.k, tok0, kt * kTile, seq, H, h, dqk);
  stage_rows<vStride>(v_s, a.v, tok0, kt * kTile, seq, H, h, dv);
  if constexpr (C.kv_regs > 0) cp_async_commit();  // K and V apart: read into registers first
  load_queries(kt, 0);
  cp_async_commit();

  // Scores: A = the warp's 16 keys of K (V), B = its 32 queries of Q (dO), as K in the forward.
  const uint32_t k_a = shared_address(k_s + 16 * w4 * qStride + frag_rows_offset(lane, qStride));
  const uint32_t v_a = shared_address(v_s + 16 * w4 * vStride + frag_rows_offset(lane, vStride));
  const int q_b = 32 * half * qStride + frag_cols_offset(lane, qStride);
  const int do_b = 32 * half * vStride + frag_cols_offset(lane, vStride);
  // Products: A = the warp's 16 rows of P^T (dS^T), B = dO (Q) at the warp's columns, as V.
  const uint32_t p_a = shared_address(p_s + 16 * w4 * sStride + frag_rows_offset(lane, sStride));
  const uint32_t ds_a = shared_address(ds_s + 16 * w4 * sStride + frag_rows_offset(lane, sStride));
  const int kc0 = half * (QK / 2), vc0 = half * (VD / 2);  // the warp's dK and dV columns
  const int q_z = kc0 + frag_rows_offset(lane, qStride);
  const int do_z = vc0 + frag_rows_offset(lane, vStride);

  // With kv_regs, the warp's K (and V) fragments, read once: the scores then read only Q and dO
  // from shared memory (2 instead of 3 ldmatrix per 4 mma).
  uint32_t kf[C.kv_regs >= 1 ? QK / 16 : 1][4], vf[C.kv_regs >= 2 ? VD / 16 : 1][4];
  if constexpr (C.kv_regs > 0) {
    cp_async_wait_one();  // K and V have landed
    __syncthreads();
    load_frags<QK / 16, qStride>(kf, k_a, dqk);
    if constexpr (C.kv_regs >= 2) load_frags<VD / 16, vStride>(vf, v_a, dv);
  }

  float dk_acc[1][QK / 16][4], dv_acc[1][VD / 16][4];
  zero(dk_acc);
  zero(dv_acc);
  const int key0 = kt * kTile + 16 * w4 + g, key1 = key0 + 8;  // the lane's rows of S^T

  for (int qt = kt; qt < tiles; ++qt) {
    const int buf = (qt - kt) & 1;
    // Prefetch the next query tile (always commit, so that "all but the newest group done"
    // means this tile, and at the first one K and V, have landed).
    if (qt + 1 < tiles) load_queries(qt + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait_one();
    __syncthreads();
    const uint16_t* const qb = q_s + buf * kTile * qStride;
    const uint16_t* const dob = do_s + buf * kTile * vStride;
    const float* const lse_s = stat_s + buf * 2 * kTile;
    const float* const delta_s = lse_s + kTile;

    float s[1][4][4], dp[1][4][4];  // S^T and dP^T: 16 keys x 32 queries
    if constexpr (C.kv_regs >= 1)
      scores_x32<1, QK / 16, qStride>(s, RegFrag<QK / 16>{kf}, shared_address(qb + q_b), dqk);
    else
      scores_x32<1, QK / 16, qStride>(s, SharedFrag<qStride>{k_a}, shared_address(qb + q_b), dqk);
    if constexpr (C.kv_regs >= 2)
      scores_x32<1, VD / 16, vStride>(dp, RegFrag<VD / 16>{vf}, shared_address(dob + do_b), dv);
    else
      scores_x32<1, VD / 16, vStride>(dp, SharedFrag<vStride>{v_a}, shared_address(dob + do_b), dv);
    // P^T and dS^T; the query is the column here. Off the diagonal tile every key precedes every
    // query; queries past the sequence (zero rows, zero lse) get zero.
    const bool diagonal = qt == kt;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 32 * half + 8 * nt + 2 * t + e, query = qt * kTile + c;
        const float l2 = lse_s[c] * kLog2e, d = delta_s[c];
        const bool ok0 = query < seq && (!diagonal || query >= key0);
        const bool ok1 = query < seq && (!diagonal || query >= key1);
        const float p0 = ok0 ? exp2f(s[0][nt][e] * a.scale_log2 - l2) : 0.0f;
        const float p1 = ok1 ? exp2f(s[0][nt][2 + e] * a.scale_log2 - l2) : 0.0f;
        s[0][nt][e] = p0;
        s[0][nt][2 + e] = p1;
        dp[0][nt][e] = p0 * (dp[0][nt][e] - d) * a.scale;
        dp[0][nt][2 + e] = p1 * (dp[0][nt][2 + e] - d) * a.scale;
      }
    store_x32(p_s + 16 * w4 * sStride + 32 * half, s, g, t);
    store_x32(ds_s + 16 * w4 * sStride + 32 * half, dp, g, t);
    __syncthreads();  // the other half of the warp's rows comes from warp w ^ 4

    // dV += P^T dO and dK += dS^T Q over the tile's 64 queries, the warp's half of the columns.
    accumulate_x64<1, VD / 16, vStride>(dv_acc, p_a, shared_address(dob + do_z), dv - vc0);
    accumulate_x64<1, QK / 16, qStride>(dk_acc, ds_a, shared_address(qb + q_z), dqk - kc0);
    __syncthreads();  // the next iteration overwrites P^T, dS^T and this tile's buffers
  }

  store_rows(a.dk, dk_acc, tok0, key0, seq, H, h, dqk, kc0, t);
  store_rows(a.dv, dv_acc, tok0, key0, seq, H, h, dv, vc0, t);
}

// Block (query tile of 64 MT rows, head, sequence); warp (w % 4, w / 4) owns rows
// [16 MT (w % 4), +16 MT) and, for the scores, key columns [32 (w / 4), +32) of each key tile.
template <int QK, int VD, int V>
__global__ void __launch_bounds__(kBwdThreads, bwd_cfg<QK, VD, V>().dq_stages == 1 ? 2 : 1)
    flash_dq_kernel(const FlashBwdArgs a) {
  constexpr BwdCfg C = bwd_cfg<QK, VD, V>();
  constexpr int MT = C.dq_mt, BM = kTile * MT, S = C.dq_stages;
  static_assert((MT == 1 || MT == 2) && (S == 1 || S == 2) && (!C.qdo_regs || MT == 1));
  constexpr int qStride = QK + kPad, vStride = VD + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* const q_s = smem;                        // [BM][qStride], the block's queries
  uint16_t* const do_s = q_s + BM * qStride;         // [BM][vStride]
  uint16_t* const k_s = do_s + BM * vStride;         // S x [64][qStride], key tile buffers
  uint16_t* const v_s = k_s + S * kTile * qStride;   // S x [64][vStride]
  uint16_t* const ds_s = v_s + S * kTile * vStride;  // [BM][sStride]: dS, queries x keys

  const int qt = int(gridDim.x) - 1 - int(blockIdx.x);  // the longest tiles first
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int seq = a.seq, H = a.heads, dqk = a.dqk, dv = a.dvd;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4, w4 = warp % 4, half = warp / 4;
  const int64_t tok0 = int64_t(b) * seq;
  const int wrow = qt * BM + 16 * MT * w4, row0 = wrow + g;  // the warp's and lane's first rows
  // Key tiles up to the block's last query (or the sequence's last key).
  const int tiles = min((qt + 1) * MT, (seq + kTile - 1) / kTile);

  auto load_keys = [&](int kt, int buf) {
    stage_rows<qStride>(k_s + buf * kTile * qStride, a.k, tok0, kt * kTile, seq, H, h, dqk);
    stage_rows<vStride>(v_s + buf * kTile * vStride, a.v, tok0, kt * kTile, seq, H, h, dv);
  };
  stage_rows<qStride, BM>(q_s, a.q, tok0, qt * BM, seq, H, h, dqk);
  stage_rows<vStride, BM>(do_s, a.dout, tok0, qt * BM, seq, H, h, dv);
  if constexpr (C.qdo_regs) cp_async_commit();  // Q and dO apart: read into registers first
  load_keys(0, 0);
  cp_async_commit();

  // The row statistics of the lane's queries (m-tile i: rows row0 + 16i, +8), read while the
  // first tiles load.
  const int64_t stats = (int64_t(b) * H + h) * seq;
  float l2[MT][2], dd[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 16 * i + 8 * r;
      l2[i][r] = row < seq ? a.lse[stats + row] * kLog2e : 0.0f;
      dd[i][r] = row < seq ? a.delta[stats + row] : 0.0f;
    }

  // Scores: A = the warp's 16 MT queries of Q (dO), B = its 32 keys of K (V).
  const uint32_t q_a =
      shared_address(q_s + 16 * MT * w4 * qStride + frag_rows_offset(lane, qStride));
  const uint32_t do_a =
      shared_address(do_s + 16 * MT * w4 * vStride + frag_rows_offset(lane, vStride));
  const int k_b = 32 * half * qStride + frag_cols_offset(lane, qStride);
  const int v_b = 32 * half * vStride + frag_cols_offset(lane, vStride);
  // Product: A = the warp's 16 MT rows of dS, B = K at the warp's half of the columns.
  const uint32_t ds_a =
      shared_address(ds_s + 16 * MT * w4 * sStride + frag_rows_offset(lane, sStride));
  const int qc0 = half * (QK / 2);
  const int k_z = qc0 + frag_rows_offset(lane, qStride);

  // With qdo_regs, the warp's Q and dO fragments, read once.
  uint32_t qf[C.qdo_regs ? QK / 16 : 1][4], dof[C.qdo_regs ? VD / 16 : 1][4];
  if constexpr (C.qdo_regs) {
    cp_async_wait_one();  // Q and dO have landed
    __syncthreads();
    load_frags<QK / 16, qStride>(qf, q_a, dqk);
    load_frags<VD / 16, vStride>(dof, do_a, dv);
  }

  float dq_acc[MT][QK / 16][4];
  zero(dq_acc);

  for (int kt = 0; kt < tiles; ++kt) {
    const int buf = S == 2 ? kt & 1 : 0;
    if constexpr (S == 2) {
      if (kt + 1 < tiles) load_keys(kt + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait_one();
    } else {  // single buffer: the previous iteration's last barrier freed it
      if (kt > 0) {
        load_keys(kt, 0);
        cp_async_commit();
      }
      cp_async_wait_all();
    }
    __syncthreads();
    const uint16_t* const kb = k_s + buf * kTile * qStride;
    const uint16_t* const vb = v_s + buf * kTile * vStride;

    float s[MT][4][4], dp[MT][4][4];  // S and dP: 16 MT queries x 32 keys
    if constexpr (C.qdo_regs) {
      scores_x32<1, QK / 16, qStride>(s, RegFrag<QK / 16>{qf}, shared_address(kb + k_b), dqk);
      scores_x32<1, VD / 16, vStride>(dp, RegFrag<VD / 16>{dof}, shared_address(vb + v_b), dv);
    } else {
      scores_x32<MT, QK / 16, qStride>(s, SharedFrag<qStride>{q_a}, shared_address(kb + k_b), dqk);
      scores_x32<MT, VD / 16, vStride>(dp, SharedFrag<vStride>{do_a}, shared_address(vb + v_b), dv);
    }
    // dS; the query is the row here. Tiles that reach past the block's first query are masked
    // per element (keys past the sequence are past every real query, so masked there too).
    const bool masked = kt * kTile + kTile - 1 > qt * BM;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = kt * kTile + 32 * half + 8 * nt + 2 * t + e;
          const int r0 = row0 + 16 * i, r1 = r0 + 8;
          const bool ok0 = r0 < seq && (!masked || key <= r0);
          const bool ok1 = r1 < seq && (!masked || key <= r1);
          const float p0 = ok0 ? exp2f(s[i][nt][e] * a.scale_log2 - l2[i][0]) : 0.0f;
          const float p1 = ok1 ? exp2f(s[i][nt][2 + e] * a.scale_log2 - l2[i][1]) : 0.0f;
          dp[i][nt][e] = p0 * (dp[i][nt][e] - dd[i][0]) * a.scale;
          dp[i][nt][2 + e] = p1 * (dp[i][nt][2 + e] - dd[i][1]) * a.scale;
        }
    store_x32(ds_s + 16 * MT * w4 * sStride + 32 * half, dp, g, t);
    __syncthreads();  // the other half of the warp's rows comes from warp w ^ 4

    // dQ += dS K over the tile's 64 keys, the warp's half of the columns.
    accumulate_x64<MT, QK / 16, qStride>(dq_acc, ds_a, shared_address(kb + k_z), dqk - qc0);
    __syncthreads();  // the next iteration overwrites dS and this tile's buffers
  }

  store_rows(a.dq, dq_acc, tok0, row0, seq, H, h, dqk, qc0, t);
}

template <int QK, int VD, int V>
cudaError_t launch_backward(const FlashBwdArgs& args, int64_t batch) {
  constexpr BwdCfg C = bwd_cfg<QK, VD, V>();
  constexpr size_t dkdv_smem = dkdv_smem_bytes<QK, VD>();
  constexpr size_t dq_smem = dq_smem_bytes<QK, VD, C.dq_mt, C.dq_stages>();
  static_assert(dkdv_smem <= kMaxSmem && dq_smem <= kMaxSmem);
  static const cudaError_t attr = [] {
    const cudaError_t e =
        cudaFuncSetAttribute(reinterpret_cast<const void*>(&flash_dkdv_kernel<QK, VD, V>),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, int(dkdv_smem));
    if (e != cudaSuccess) return e;
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(&flash_dq_kernel<QK, VD, V>),
                                cudaFuncAttributeMaxDynamicSharedMemorySize, int(dq_smem));
  }();
  if (attr != cudaSuccess) return attr;
  const unsigned heads = unsigned(args.heads), seqs = unsigned(batch);
  const dim3 grid(unsigned((args.seq + kTile - 1) / kTile), heads, seqs);
  flash_dkdv_kernel<QK, VD, V><<<grid, kBwdThreads, dkdv_smem, stream()>>>(args);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  constexpr int dq_rows = kTile * C.dq_mt;
  const dim3 dq_grid(unsigned((args.seq + dq_rows - 1) / dq_rows), heads, seqs);
  flash_dq_kernel<QK, VD, V><<<dq_grid, kBwdThreads, dq_smem, stream()>>>(args);
  return cudaGetLastError();
}

// The smallest instance that holds both dims (shared memory 217 KB at 256/256), variant V.
template <int V>
cudaError_t launch_variant(const FlashBwdArgs& args, int64_t batch) {
  if (args.dqk <= 64 && args.dvd <= 64) return launch_backward<64, 64, V>(args, batch);
  if (args.dqk <= 128 && args.dvd <= 128) return launch_backward<128, 128, V>(args, batch);
  if (args.dqk <= 192 && args.dvd <= 128) return launch_backward<192, 128, V>(args, batch);
  return launch_backward<256, 256, V>(args, batch);
}

bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace

bool flash_attention_backward_supported(const AttentionShape& s, const float* dq, const float* dk,
                                        const float* dv, const void* dout, const void* q,
                                        const void* k, const void* v) {
  auto dim_ok = [](int64_t d) { return d >= 16 && d <= 256 && d % 16 == 0; };
  return dim_ok(s.dqk) && dim_ok(s.dv) && s.seq >= 1 && s.seq <= (int64_t(1) << 30) &&
         s.heads >= 1 && s.heads <= 65535 && s.batch >= 1 && s.batch <= 65535 && aligned(dq, 8) &&
         aligned(dk, 8) && aligned(dv, 8) && aligned(dout, 16) && aligned(q, 16) &&
         aligned(k, 16) && aligned(v, 16);
}

cudaError_t flash_attention_backward(float* dq, float* dk, float* dv, const void* dout,
                                     const float* lse, const float* delta, const void* q,
                                     const void* k, const void* v, const AttentionShape& s) {
  if (s.batch * s.seq * s.heads == 0) return cudaSuccess;
  if (!flash_attention_backward_supported(s, dq, dk, dv, dout, q, k, v))
    return cudaErrorInvalidValue;
  const FlashBwdArgs args{dq,
                          dk,
                          dv,
                          static_cast<const uint16_t*>(q),
                          static_cast<const uint16_t*>(k),
                          static_cast<const uint16_t*>(v),
                          static_cast<const uint16_t*>(dout),
                          lse,
                          delta,
                          int(s.seq),
                          int(s.heads),
                          int(s.dqk),
                          int(s.dv),
                          s.scale,
                          s.scale * kLog2e};
  // Default: variant 1 (the dQ kernel with 32 query rows per warp), the fastest on the H200
  // (192/128, 16 heads: 2.249 ms at batch 4 x 2048 against 2.524 for variant 0 and 2.28 for 3
  // and 4; 0.726 vs 0.763 at batch 1).
  // Variants 5-7: the wgmma kernels (cuda_flash_attention_hopper_bwd.cu), tilings 0-2,
  // the default where the build, the device and the head dims have them (192/128, 16 heads, batch
  // 4 x 2048 on the H200: see bench/RESULTS.md).
  const bool hopper = flash_attention_backward_hopper_supported(int(s.dqk), int(s.dv));
  const int variant =
      flash_variant("MOEKIT_FLASH_BWD_VARIANT", kBwdVariantCount + kHopperBwdTilings,
                    hopper ? kBwdVariantCount : 1);
  if (variant >= kBwdVariantCount && hopper)
    return flash_attention_backward_hopper(args, s.batch, variant - kBwdVariantCount);
  switch (variant) {
    case 0:
      return launch_variant<0>(args, s.batch);
    case 2:
      return launch_variant<2>(args, s.batch);
    case 3:
      return launch_variant<3>(args, s.batch);
    case 4:
      return launch_variant<4>(args, s.batch);
    default:  // 1, or a Hopper variant where the wgmma kernels do not run
      return launch_variant<1>(args, s.batch);
  }
}

}  // namespace moekit::cuda
