// CUDA kernels, part 5d: the causal attention backward of Precision::Bf16 as two fused kernels on
// the bf16 tensor cores (the forward: cuda_flash_attention.cu; host side: cuda_attention_tc.cpp,
// which keeps the cuBLAS path of cuda_attention_tc.cu as the fallback). The GEMM path writes fp32
// S and dP for every score to memory and runs five GEMMs around a row kernel; here a 64 x 64 block
// of scores is recomputed in registers from the saved lse and consumed in shared memory.
//
// Numerics, as the GEMM path: q, k, v, dO bf16 (rounded once by the caller), S = Q K^T and
// dP = dO V^T with fp32 accumulation, P = exp(scale S - lse) in fp32 (as exp2 of scores scaled by
// scale * log2(e), the forward's base), dS = P * (dP - delta) * scale with delta = rowsum(dO * O)
// from attention_delta (fp32, unrounded dO and O); P and dS rounded to bf16 as the A operands of
// dV = P^T dO, dK = dS^T Q and dQ = dS K, accumulated in fp32.
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
// Only the diagonal tile pair is masked; rows past the sequence's end are staged as zeros (cp.async
// zero fill) and their P and dS set to zero, so they add nothing.
#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/mma_util.cuh"

namespace moekit::cuda {

namespace {

constexpr int kTile = 64;  // keys per key tile, queries per query tile
constexpr int kWarps = 8;  // 4 row groups of 16 x 2 column halves
constexpr int kBwdThreads = kWarps * 32;
constexpr int sStride = kTile + kPad;  // row stride of the bf16 P / dS tiles in shared memory

struct BwdArgs {
  float *dq, *dk, *dv;
  const uint16_t *q, *k, *v, *dout;  // bf16 bits
  const float *lse, *delta;          // [batch, heads, seq]
  int seq, heads, dqk, dvd;          // dvd: v's head dim
  float scale, scale_log2;           // scale, scale * log2(e)
};

// Stages rows r0..r0+63 of head h of a bf16 [tokens, heads, dim] tensor (token tok0 + row) into
// shared memory at dst (row stride `stride` elements): rows past `seq` are zero (their src is
// never read), columns past dim are left alone (no k-step or n-tile reads them).
template <int Stride>
__device__ inline void stage_rows(uint16_t* dst, const uint16_t* src, int64_t tok0, int r0, int seq,
                                  int heads, int h, int dim) {
  const int pieces = dim / 8;  // 16-byte pieces per row
  const uint32_t d = shared_address(dst);
  for (int i = int(threadIdx.x); i < kTile * pieces; i += kBwdThreads) {
    const int r = i / pieces, c = i % pieces, j = r0 + r;
    const int64_t tok = tok0 + (j < seq ? j : 0);
    cp_async16(d + uint32_t((r * Stride + c * 8) * 2), src + (tok * heads + h) * dim + c * 8,
               j < seq);
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

// acc = X Y^T for the warp's 16 rows of X and 32 rows of Y, both row-major bf16 in shared memory,
// over `dim` (a multiple of 16; k-steps past it skipped). x: X's 16-row block plus the lane's
// frag_rows_offset; y: Y's 32-row block plus frag_cols_offset (shared addresses). Element
// (row g (+8), column 8nt + 2t (+1)) lands in acc[nt][0..1] ([2..3]).
template <int Steps, int YStride>
__device__ inline void scores_16x32(float (&acc)[4][4], uint32_t x, uint32_t y, int dim) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < Steps; ++kk) {
    if (kk * 16 >= dim) continue;
    uint32_t xa[4];
    ldmatrix_x4(xa, x + uint32_t(kk * 16 * 2));
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      uint32_t yb[4];
      ldmatrix_x4(yb, y + uint32_t((16 * p * YStride + 16 * kk) * 2));
      mma_bf16(acc[2 * p], xa, yb[0], yb[1]);
      mma_bf16(acc[2 * p + 1], xa, yb[2], yb[3]);
    }
  }
}

// The warp's 16 x 32 block in scores_16x32's layout, rounded to bf16, into a shared tile of row
// stride sStride at dst (the block's first element). One 32-bit store per pair: a row stride of
// 36 words puts the 8 rows x 4 words of one store on distinct banks.
__device__ inline void store_16x32(uint16_t* dst, const float (&x)[4][4], int g, int t) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    *reinterpret_cast<uint32_t*>(dst + g * sStride + 8 * nt + 2 * t) =
        pack_bf16(x[nt][0], x[nt][1]);
    *reinterpret_cast<uint32_t*>(dst + (g + 8) * sStride + 8 * nt + 2 * t) =
        pack_bf16(x[nt][2], x[nt][3]);
  }
}

// acc += T Z for the warp's 16 rows of T (bf16 [64 rows, 64], row stride sStride, in shared
// memory) and Z (bf16 [64, columns] row-major in shared memory): a: T's 16-row block plus
// frag_rows_offset; z: Z's first column of the warp plus frag_rows_offset. acc[n] holds columns
// 8n..8n+7 of the warp's; pairs of n-tiles at or past `cols` are skipped (cols a multiple of 16,
// possibly <= 0).
template <int NT, int ZStride>
__device__ inline void accumulate_16x64(float (&acc)[NT][4], uint32_t a, uint32_t z, int cols) {
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    uint32_t ta[4];
    ldmatrix_x4(ta, a + uint32_t(kk * 16 * 2));
#pragma unroll
    for (int p = 0; p < NT / 2; ++p) {
      if (p * 16 >= cols) continue;
      uint32_t zb[4];
      ldmatrix_x4_trans(zb, z + uint32_t((16 * kk * ZStride + 16 * p) * 2));
      mma_bf16(acc[2 * p], ta, zb[0], zb[1]);
      mma_bf16(acc[2 * p + 1], ta, zb[2], zb[3]);
    }
  }
}

template <int NT>
__device__ inline void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// Writes acc (rows row0 = the lane's row g, row0 + 8; columns c0 + 8n + 2t, +1) into head h of a
// fp32 [tokens, heads, dim] tensor: rows below seq, columns below dim.
template <int NT>
__device__ inline void store_rows(float* out, const float (&acc)[NT][4], int64_t tok0, int row0,
                                  int seq, int heads, int h, int dim, int c0, int t) {
  const int row1 = row0 + 8;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int col = c0 + n * 8 + 2 * t;
    if (col >= dim) continue;
    if (row0 < seq)
      *reinterpret_cast<float2*>(out + ((tok0 + row0) * heads + h) * dim + col) =
          make_float2(acc[n][0], acc[n][1]);
    if (row1 < seq)
      *reinterpret_cast<float2*>(out + ((tok0 + row1) * heads + h) * dim + col) =
          make_float2(acc[n][2], acc[n][3]);
  }
}

// QK: dqk rounded up to a multiple of 64, VD: dv rounded up likewise (shared widths; each warp's
// half of the dK and dV columns is QK / 2 and VD / 2 wide).
template <int QK, int VD>
constexpr size_t dkdv_smem_bytes() {
  return size_t(kTile) * (3 * (QK + kPad) + 3 * (VD + kPad) + 2 * sStride) * sizeof(uint16_t) +
         size_t(2) * 2 * kTile * sizeof(float);
}
template <int QK, int VD>
constexpr size_t dq_smem_bytes() {
  return size_t(kTile) * (3 * (QK + kPad) + 3 * (VD + kPad) + sStride) * sizeof(uint16_t);
}

template <int QK, int VD>
__global__ void __launch_bounds__(kBwdThreads, 1) flash_dkdv_kernel(const BwdArgs a) {
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

  float dk_acc[QK / 16][4], dv_acc[VD / 16][4];
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

    float s[4][4], dp[4][4];  // S^T and dP^T: 16 keys x 32 queries
    scores_16x32<QK / 16, qStride>(s, k_a, shared_address(qb + q_b), dqk);
    scores_16x32<VD / 16, vStride>(dp, v_a, shared_address(dob + do_b), dv);
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
        const float p0 = ok0 ? exp2f(s[nt][e] * a.scale_log2 - l2) : 0.0f;
        const float p1 = ok1 ? exp2f(s[nt][2 + e] * a.scale_log2 - l2) : 0.0f;
        s[nt][e] = p0;
        s[nt][2 + e] = p1;
        dp[nt][e] = p0 * (dp[nt][e] - d) * a.scale;
        dp[nt][2 + e] = p1 * (dp[nt][2 + e] - d) * a.scale;
      }
    store_16x32(p_s + 16 * w4 * sStride + 32 * half, s, g, t);
    store_16x32(ds_s + 16 * w4 * sStride + 32 * half, dp, g, t);
    __syncthreads();  // the other half of the warp's rows comes from warp w ^ 4

    // dV += P^T dO and dK += dS^T Q over the tile's 64 queries, the warp's half of the columns.
    accumulate_16x64<VD / 16, vStride>(dv_acc, p_a, shared_address(dob + do_z), dv - vc0);
    accumulate_16x64<QK / 16, qStride>(dk_acc, ds_a, shared_address(qb + q_z), dqk - kc0);
    __syncthreads();  // the next iteration overwrites P^T, dS^T and this tile's buffers
  }

  store_rows(a.dk, dk_acc, tok0, key0, seq, H, h, dqk, kc0, t);
  store_rows(a.dv, dv_acc, tok0, key0, seq, H, h, dv, vc0, t);
}

template <int QK, int VD>
__global__ void __launch_bounds__(kBwdThreads, 1) flash_dq_kernel(const BwdArgs a) {
  constexpr int qStride = QK + kPad, vStride = VD + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* const q_s = smem;                        // [64][qStride], the block's queries
  uint16_t* const do_s = q_s + kTile * qStride;      // [64][vStride]
  uint16_t* const k_s = do_s + kTile * vStride;      // 2 x [64][qStride], key tile buffers
  uint16_t* const v_s = k_s + 2 * kTile * qStride;   // 2 x [64][vStride]
  uint16_t* const ds_s = v_s + 2 * kTile * vStride;  // [64][sStride]: dS, queries x keys

  const int qt = int(gridDim.x) - 1 - int(blockIdx.x);  // the longest tiles first
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int seq = a.seq, H = a.heads, dqk = a.dqk, dv = a.dvd;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4, w4 = warp % 4, half = warp / 4;
  const int64_t tok0 = int64_t(b) * seq;
  const int row0 = qt * kTile + 16 * w4 + g, row1 = row0 + 8;  // the lane's queries

  auto load_keys = [&](int kt, int buf) {
    stage_rows<qStride>(k_s + buf * kTile * qStride, a.k, tok0, kt * kTile, seq, H, h, dqk);
    stage_rows<vStride>(v_s + buf * kTile * vStride, a.v, tok0, kt * kTile, seq, H, h, dv);
  };
  stage_rows<qStride>(q_s, a.q, tok0, qt * kTile, seq, H, h, dqk);
  stage_rows<vStride>(do_s, a.dout, tok0, qt * kTile, seq, H, h, dv);
  load_keys(0, 0);
  cp_async_commit();

  // The row statistics of the lane's two queries, read while the first tiles load.
  const int64_t stats = (int64_t(b) * H + h) * seq;
  const float l2_0 = row0 < seq ? a.lse[stats + row0] * kLog2e : 0.0f;
  const float l2_1 = row1 < seq ? a.lse[stats + row1] * kLog2e : 0.0f;
  const float d0 = row0 < seq ? a.delta[stats + row0] : 0.0f;
  const float d1 = row1 < seq ? a.delta[stats + row1] : 0.0f;

  // Scores: A = the warp's 16 queries of Q (dO), B = its 32 keys of K (V).
  const uint32_t q_a = shared_address(q_s + 16 * w4 * qStride + frag_rows_offset(lane, qStride));
  const uint32_t do_a = shared_address(do_s + 16 * w4 * vStride + frag_rows_offset(lane, vStride));
  const int k_b = 32 * half * qStride + frag_cols_offset(lane, qStride);
  const int v_b = 32 * half * vStride + frag_cols_offset(lane, vStride);
  // Product: A = the warp's 16 rows of dS, B = K at the warp's half of the columns.
  const uint32_t ds_a = shared_address(ds_s + 16 * w4 * sStride + frag_rows_offset(lane, sStride));
  const int qc0 = half * (QK / 2);
  const int k_z = qc0 + frag_rows_offset(lane, qStride);

  float dq_acc[QK / 16][4];
  zero(dq_acc);

  for (int kt = 0; kt <= qt; ++kt) {
    const int buf = kt & 1;
    if (kt < qt) load_keys(kt + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait_one();
    __syncthreads();
    const uint16_t* const kb = k_s + buf * kTile * qStride;
    const uint16_t* const vb = v_s + buf * kTile * vStride;

    float s[4][4], dp[4][4];  // S and dP: 16 queries x 32 keys
    scores_16x32<QK / 16, qStride>(s, q_a, shared_address(kb + k_b), dqk);
    scores_16x32<VD / 16, vStride>(dp, do_a, shared_address(vb + v_b), dv);
    // dS; the query is the row here. Keys past the sequence are past every real query (masked
    // on the diagonal tile, the only one that has them).
    const bool diagonal = kt == qt;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = kt * kTile + 32 * half + 8 * nt + 2 * t + e;
        const bool ok0 = row0 < seq && (!diagonal || key <= row0);
        const bool ok1 = row1 < seq && (!diagonal || key <= row1);
        const float p0 = ok0 ? exp2f(s[nt][e] * a.scale_log2 - l2_0) : 0.0f;
        const float p1 = ok1 ? exp2f(s[nt][2 + e] * a.scale_log2 - l2_1) : 0.0f;
        dp[nt][e] = p0 * (dp[nt][e] - d0) * a.scale;
        dp[nt][2 + e] = p1 * (dp[nt][2 + e] - d1) * a.scale;
      }
    store_16x32(ds_s + 16 * w4 * sStride + 32 * half, dp, g, t);
    __syncthreads();  // the other half of the warp's rows comes from warp w ^ 4

    // dQ += dS K over the tile's 64 keys, the warp's half of the columns.
    accumulate_16x64<QK / 16, qStride>(dq_acc, ds_a, shared_address(kb + k_z), dqk - qc0);
    __syncthreads();  // the next iteration overwrites dS and this tile's buffers
  }

  store_rows(a.dq, dq_acc, tok0, row0, seq, H, h, dqk, qc0, t);
}

template <int QK, int VD>
cudaError_t launch_backward(const BwdArgs& args, int64_t batch) {
  constexpr size_t dkdv_smem = dkdv_smem_bytes<QK, VD>(), dq_smem = dq_smem_bytes<QK, VD>();
  static const cudaError_t attr = [] {
    const cudaError_t e =
        cudaFuncSetAttribute(reinterpret_cast<const void*>(&flash_dkdv_kernel<QK, VD>),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, int(dkdv_smem));
    if (e != cudaSuccess) return e;
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(&flash_dq_kernel<QK, VD>),
                                cudaFuncAttributeMaxDynamicSharedMemorySize, int(dq_smem));
  }();
  if (attr != cudaSuccess) return attr;
  const dim3 grid(unsigned((args.seq + kTile - 1) / kTile), unsigned(args.heads), unsigned(batch));
  flash_dkdv_kernel<QK, VD><<<grid, kBwdThreads, dkdv_smem, stream()>>>(args);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  flash_dq_kernel<QK, VD><<<grid, kBwdThreads, dq_smem, stream()>>>(args);
  return cudaGetLastError();
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
  const BwdArgs args{dq,
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
  // The smallest instance that holds both dims (shared memory 217 KB at 256/256).
  if (s.dqk <= 64 && s.dv <= 64) return launch_backward<64, 64>(args, s.batch);
  if (s.dqk <= 128 && s.dv <= 128) return launch_backward<128, 128>(args, s.batch);
  if (s.dqk <= 192 && s.dv <= 128) return launch_backward<192, 128>(args, s.batch);
  return launch_backward<256, 256>(args, s.batch);
}

}  // namespace moekit::cuda
