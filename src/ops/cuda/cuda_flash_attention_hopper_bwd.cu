// CUDA kernels, part 5f: the causal flash-attention backward on Hopper's warpgroup MMA (wgmma,
// sm_90a), the default backward of Precision::Bf16 on an H100/H200 where the head dims fit
// (cuda_flash_attention_bwd.cu picks it: variants 5-7 of MOEKIT_FLASH_BWD_VARIANT, tilings 0-2
// here). Same contract, numerics and split as the mma.sync kernels there: q, k, v, dO bf16;
// S = Q K^T and dP = dO V^T with fp32 accumulation; P = exp2(S scale log2(e) - lse log2(e)) in
// fp32 (one FMA and one ex2 per score, as the Hopper forward); dS = P (dP - delta) scale; P and dS
// rounded to bf16 as the A operands of dV = P^T dO, dK = dS^T Q and dQ = dS K, accumulated in
// fp32. Deterministic without atomics: a dK/dV kernel whose block owns a tile of keys and sums the
// query tiles in order, and a dQ kernel whose block owns a tile of queries and sums the key tiles
// in order (S and dP computed in both: 4 dqk + 3 dv products per score instead of 3 dqk + 2 dv).
//
// Why wgmma (see cuda_flash_attention_hopper.cu): mma.sync runs at about two thirds of Hopper's
// tensor-core rate and passes every B fragment through registers; here B operands are read from
// 128-byte-swizzled shared memory by the tensor cores, and each product's A operand comes from
// registers where the previous product left it:
//  - dK/dV kernel: the rows of every product are keys. S^T = K Q^T and dP^T = V dO^T put the keys
//    on the accumulator's rows, so P^T and dS^T are already the A fragments of dV += P^T dO and
//    dK += dS^T Q (B = dO and Q tiles read MN-major, the same tiles the scores read K-major).
//  - dQ kernel: the rows are queries: S = Q K^T and dP = dO V^T, dS is the A fragment of
//    dQ += dS K (B = the K tile, MN-major).
// No product goes through shared memory. A warpgroup owns 64 rows (one m64 wgmma); the
// warpgroups of a block share the streamed tiles. Every warpgroup runs every tile of its block (a
// branch between a wgmma and its wait makes ptxas serialize all of them): a warpgroup's tiles
// wholly on the masked side compute zeros.
//
// Tilings (`tiling`, kTilings; measured on the H200 at 4 x 2048, 16 heads, 192/128, against
// 1.993-2.018 ms for the mma.sync kernels' variant 1):
//  0  two warpgroups per block (128 keys or queries), query tiles of 64 in the dK/dV kernel, key
//     tiles of 64 in the dQ kernel, two buffers each: 1.201-1.223 ms, the default. The dK/dV
//     kernel holds (dqk + dv) / 2 = 160 accumulator registers per lane at 192/128 plus 64 for
//     S^T and dP^T: 255 registers, 96 bytes spilled.
//  1  query tiles of 32 (half the score registers: 253, no spill): 1.277-1.297 ms.
//  2  one warpgroup per block and two blocks per SM, which share no barrier (one's softmax can
//     run under the other's products), tiles of 32: 1.296 ms; the loads shared by two warpgroups
//     matter more. (Three buffers instead of two: 1.242 and 1.265 ms for tilings 0 and 1.)
// The results are bit-identical to the mma.sync kernels' (the same P, dS and k order).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_args.cuh"
#include "ops/cuda/mma_util.cuh"
#include "ops/cuda/stream.h"
#include "ops/cuda/wgmma_util.cuh"

namespace moekit::cuda {

namespace {

constexpr size_t kMaxSmem = 227 * 1024;  // sm_90's opt-in shared memory per block

// A block shape and buffering of both kernels (the tilings of the header).
struct Tiling {
  int wgs;        // warpgroups per block, 64 rows (keys or queries) each
  int bm;         // dK/dV kernel: queries per streamed tile (32 or 64)
  int kv_stages;  // its Q / dO buffers
  int bn;         // dQ kernel: keys per streamed tile (32 or 64)
  int dq_stages;  // its K / V buffers
};
constexpr Tiling kTilings[] = {
    {2, 64, 2, 64, 2},  // 0
    {2, 32, 2, 64, 2},  // 1
    {1, 32, 2, 32, 2},  // 2
};
static_assert(sizeof(kTilings) / sizeof(kTilings[0]) == kHopperBwdTilings);
template <int V>
constexpr int block_threads = 128 * kTilings[V].wgs;
template <int V>
constexpr int block_rows = 64 * kTilings[V].wgs;  // a block's keys (dK/dV) or queries (dQ)
// One warpgroup per block: two blocks per SM, which share no barrier (one's softmax can run
// while the other's products do); two: one block, both warpgroups reading each streamed tile.
template <int V>
constexpr int blocks_per_sm = kTilings[V].wgs == 1 ? 2 : 1;

// P = exp2(s sl2 - l2) and dS = P (dp - d) scale of one score, both as stored for the products.
[[maybe_unused]] __device__ inline void weights(float& s, float& dp, float l2, float d, float sl2,
                                                float scale, bool keep) {
  const float p = keep ? fast_exp2(fmaf(s, sl2, -l2)) : 0.0f;
  s = p;
  dp = p * (dp - d) * scale;
}

// The A fragments of the next product from an m64nN accumulator (N = the next product's k):
// fragment kk covers accumulator columns 16kk..16kk + 15, p[kk][i] packs x[8kk + 2i], +1 (rows g,
// g + 8, g, g + 8; columns +0, +0, +8, +8), as the forward's P.
template <int N>
__device__ inline void to_fragments(uint32_t (&p)[N / 16][4], const float (&x)[N / 2]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) p[kk][i] = pack_bf16(x[8 * kk + 2 * i], x[8 * kk + 2 * i + 1]);
}

// Writes an m64nN accumulator (the lane's rows row0, row0 + 8; columns 8j + 2t, +1) into head h
// of a fp32 [tokens, heads, dim] tensor: rows below seq, columns below dim.
template <int N>
__device__ inline void store_acc(float* out, const float (&acc)[N / 2], int64_t tok0, int row0,
                                 int seq, int heads, int h, int dim, int t) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    const int col = 8 * j + 2 * t;
    if (col >= dim) continue;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row < seq)
        *reinterpret_cast<float2*>(out + ((tok0 + row) * heads + h) * dim + col) =
            make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
    }
  }
}

template <int N>
__device__ inline void zero(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = 0.0f;
}

// Where a block's thread works: head h of sequence b, warpgroup wg (its 64 rows start at
// wg * 64 of the block's), the lane's accumulator rows g, g + 8 of its warp's 16, columns 2t.
struct Lane {
  int h, b, tid, wg, warp, g, t;
  int64_t tok0;
  __device__ Lane(int seq) {
    h = int(blockIdx.y);
    b = int(blockIdx.z);
    tid = int(threadIdx.x);
    wg = tid / 128;
    warp = (tid % 128) / 32;
    g = (tid % 32) / 4;
    t = tid % 4;
    tok0 = int64_t(b) * seq;
  }
};

// ---- dK / dV -------------------------------------------------------------------------------
// Block (key tile of 128, head, sequence), the first key tile (the most query tiles) first. K
// and V of the block's keys stay in shared memory; query tiles of BM stream through STAGES
// buffers of Q, dO, lse and delta (cp.async, zero past the sequence), one barrier per tile.
template <int QK, int VD, int V>
struct DkdvTiles {
  static constexpr int BM = kTilings[V].bm, STAGES = kTilings[V].kv_stages;
  static constexpr uint32_t kKeyBlock = block_rows<V> * 128, kQBlock = BM * 128;  // per 64 columns
  static constexpr uint32_t kKBytes = QK / 64 * kKeyBlock, kVBytes = VD / 64 * kKeyBlock;
  static constexpr uint32_t kQBytes = QK / 64 * kQBlock, kDoBytes = VD / 64 * kQBlock;
  static constexpr uint32_t kStageBytes = kQBytes + kDoBytes;
  static constexpr size_t bytes() {
    return 1024 + kKBytes + kVBytes + size_t(STAGES) * (kStageBytes + 2 * BM * sizeof(float));
  }
  static_assert(QK % 64 == 0 && VD % 64 == 0 && QK <= 192 && VD <= 128 && QK + VD <= 320);
  static_assert((BM == 32 || BM == 64) && STAGES >= 2 &&
                blocks_per_sm<V> * (bytes() + 1024) <= kMaxSmem + 1024);
};

template <int QK, int VD, int V>
__global__ void __launch_bounds__(block_threads<V>, blocks_per_sm<V>)
    flash_dkdv_hopper_kernel(const FlashBwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = DkdvTiles<QK, VD, V>;
  constexpr int BM = T::BM, STAGES = T::STAGES, kThreads = block_threads<V>, kRows = block_rows<V>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t k_s = (shared_address(smem_raw) + 1023u) & ~1023u;
  const uint32_t v_s = k_s + T::kKBytes, stage0 = v_s + T::kVBytes;
  // lse and delta of each stage's BM queries, after the tiles (generic pointer for reading).
  float* const stats = reinterpret_cast<float*>(
      smem_raw + (stage0 + STAGES * T::kStageBytes - shared_address(smem_raw)));
  const Lane l(a.seq);
  const int seq = a.seq, H = a.heads;
  const int kt = int(gridDim.x) - 1 - int(blockIdx.x);  // reversed: key tile 0 has most queries
  const int key_wg = kt * kRows + 64 * l.wg, wkey = key_wg + 16 * l.warp;
  const int key0 = wkey + l.g, key1 = key0 + 8;
  const int64_t qk_stride = int64_t(H) * a.dqk, v_stride = int64_t(H) * a.dvd;
  const uint16_t* const q_head = a.q + (l.tok0 * H + l.h) * a.dqk;
  const uint16_t* const k_head = a.k + (l.tok0 * H + l.h) * a.dqk;
  const uint16_t* const v_head = a.v + (l.tok0 * H + l.h) * a.dvd;
  const uint16_t* const do_head = a.dout + (l.tok0 * H + l.h) * a.dvd;
  const int64_t stat0 = (int64_t(l.b) * H + l.h) * seq;
  const int first = kt * kRows / BM, tiles = (seq + BM - 1) / BM;  // query tiles first..tiles-1

  auto load_tile = [&](int qt) {
    const int buf = (qt - first) % STAGES;
    const uint32_t qb = stage0 + buf * T::kStageBytes;
    load_swizzled<BM, QK / 8, kThreads>(qb, T::kQBlock, q_head, qk_stride, qt * BM, seq, a.dqk / 8,
                                        l.tid);
    load_swizzled<BM, VD / 8, kThreads>(qb + T::kQBytes, T::kQBlock, do_head, v_stride, qt * BM,
                                        seq, a.dvd / 8, l.tid);
    for (int i = l.tid; i < 2 * BM; i += kThreads) {
      const int j = qt * BM + i % BM;
      const float* src = (i < BM ? a.lse : a.delta) + stat0 + (j < seq ? j : 0);
      cp_async4(shared_address(stats + buf * 2 * BM + i), src, j < seq);
    }
  };
  load_swizzled<kRows, QK / 8, kThreads>(k_s, T::kKeyBlock, k_head, qk_stride, kt * kRows, seq,
                                         a.dqk / 8, l.tid);
  load_swizzled<kRows, VD / 8, kThreads>(v_s, T::kKeyBlock, v_head, v_stride, kt * kRows, seq,
                                         a.dvd / 8, l.tid);
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {  // K and V ride in the first group
    if (first + i < tiles) load_tile(first + i);
    cp_async_commit();
  }

  float dv_acc[VD / 2], dk_acc[QK / 2], s[BM / 2], dp[BM / 2];
  uint32_t pf[BM / 16][4], dsf[BM / 16][4];
  zero(dv_acc);
  zero(dk_acc);
  zero(s);
  zero(dp);
  const uint32_t k_wg = k_s + 64 * 128 * l.wg, v_wg = v_s + 64 * 128 * l.wg;
  for (int qt = first; qt < tiles; ++qt) {
    const int buf = (qt - first) % STAGES;
    // Tile qt has landed once all but the newest STAGES - 2 groups have; the barrier also means
    // every warpgroup finished tile qt - 1, whose buffer the prefetch below refills.
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();
    __syncthreads();
    if (qt + STAGES - 1 < tiles) load_tile(qt + STAGES - 1);
    cp_async_commit();
    const uint32_t qb = stage0 + buf * T::kStageBytes, dob = qb + T::kQBytes;
    const float* const lse = stats + buf * 2 * BM;
    const float* const delta = lse + BM;

    wgmma_fence();
    wgmma_tiles<BM, QK>(s, k_wg, T::kKeyBlock, qb, T::kQBlock);    // S^T = K Q^T
    wgmma_tiles<BM, VD>(dp, v_wg, T::kKeyBlock, dob, T::kQBlock);  // dP^T = V dO^T
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_operands(s);
    wgmma_fence_operands(dp);
    // P^T and dS^T; the query is the column. Masked where the tile reaches a query before one of
    // the warp's keys, or past the sequence (zero rows: their lse would give P = 1).
    const bool masked = qt * BM < wkey + 15 || qt * BM + BM > seq;
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      const int c = 8 * j + 2 * l.t, query = qt * BM + c;
      const float2 ls = *reinterpret_cast<const float2*>(lse + c);
      const float2 ds = *reinterpret_cast<const float2*>(delta + c);
      const float l2[2] = {ls.x * kLog2e, ls.y * kLog2e}, d[2] = {ds.x, ds.y};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool in = !masked || query + e < seq;
        weights(s[4 * j + e], dp[4 * j + e], l2[e], d[e], a.scale_log2, a.scale,
                in && (!masked || query + e >= key0));
        weights(s[4 * j + 2 + e], dp[4 * j + 2 + e], l2[e], d[e], a.scale_log2, a.scale,
                in && (!masked || query + e >= key1));
      }
    }
    to_fragments<BM>(pf, s);
    to_fragments<BM>(dsf, dp);

    wgmma_fence();
    wgmma_regs_mn<VD, BM>(dv_acc, pf, dob, T::kQBlock);  // dV += P^T dO
    wgmma_regs_mn<QK, BM>(dk_acc, dsf, qb, T::kQBlock);  // dK += dS^T Q
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_operands(dv_acc);
    wgmma_fence_operands(dk_acc);
    wgmma_fence_operands(pf);
    wgmma_fence_operands(dsf);
  }
  cp_async_wait_all();  // no copy may land after the block's exit
  store_acc<QK>(a.dk, dk_acc, l.tok0, key0, seq, H, l.h, a.dqk, l.t);
  store_acc<VD>(a.dv, dv_acc, l.tok0, key0, seq, H, l.h, a.dvd, l.t);
#else
  __trap();  // built without sm_90a: flash_attention_hopper_available() is false
#endif
}

// ---- dQ ------------------------------------------------------------------------------------
// Block (query tile of 128, head, sequence), the last tile (the most key tiles) first. Q and dO
// of the block's queries stay in shared memory and their lse and delta in registers; key tiles of
// 64 stream through STAGES buffers of K and V, one barrier per tile.
template <int QK, int VD, int V>
struct DqTiles {
  static constexpr int BN = kTilings[V].bn, STAGES = kTilings[V].dq_stages;
  static constexpr uint32_t kQBlock = block_rows<V> * 128, kKBlock = BN * 128;  // per 64 columns
  static constexpr uint32_t kQBytes = QK / 64 * kQBlock, kDoBytes = VD / 64 * kQBlock;
  static constexpr uint32_t kKBytes = QK / 64 * kKBlock, kVBytes = VD / 64 * kKBlock;
  static constexpr uint32_t kStageBytes = kKBytes + kVBytes;
  static constexpr size_t bytes() {
    return 1024 + kQBytes + kDoBytes + size_t(STAGES) * kStageBytes;
  }
  static_assert(QK % 64 == 0 && VD % 64 == 0 && QK <= 192 && VD <= 128);
  static_assert((BN == 32 || BN == 64) && STAGES >= 2 &&
                blocks_per_sm<V> * (bytes() + 1024) <= kMaxSmem + 1024);
};

template <int QK, int VD, int V>
__global__ void __launch_bounds__(block_threads<V>, blocks_per_sm<V>)
    flash_dq_hopper_kernel(const FlashBwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = DqTiles<QK, VD, V>;
  constexpr int kKeyTile = T::BN, STAGES = T::STAGES, kThreads = block_threads<V>,
                kRows = block_rows<V>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t q_s = (shared_address(smem_raw) + 1023u) & ~1023u;
  const uint32_t do_s = q_s + T::kQBytes, stage0 = do_s + T::kDoBytes;
  const Lane l(a.seq);
  const int seq = a.seq, H = a.heads;
  const int qt = int(gridDim.x) - 1 - int(blockIdx.x);  // reversed: the last has most keys
  const int wrow = qt * kRows + 64 * l.wg + 16 * l.warp, row0 = wrow + l.g, row1 = row0 + 8;
  const int64_t qk_stride = int64_t(H) * a.dqk, v_stride = int64_t(H) * a.dvd;
  const uint16_t* const q_head = a.q + (l.tok0 * H + l.h) * a.dqk;
  const uint16_t* const k_head = a.k + (l.tok0 * H + l.h) * a.dqk;
  const uint16_t* const v_head = a.v + (l.tok0 * H + l.h) * a.dvd;
  const uint16_t* const do_head = a.dout + (l.tok0 * H + l.h) * a.dvd;
  // Key tiles up to the block's last query (or the sequence's last key).
  const int tiles =
      min(((qt + 1) * kRows + kKeyTile - 1) / kKeyTile, (seq + kKeyTile - 1) / kKeyTile);

  auto load_tile = [&](int kt) {
    const uint32_t kb = stage0 + (kt % STAGES) * T::kStageBytes;
    load_swizzled<kKeyTile, QK / 8, kThreads>(kb, T::kKBlock, k_head, qk_stride, kt * kKeyTile, seq,
                                              a.dqk / 8, l.tid);
    load_swizzled<kKeyTile, VD / 8, kThreads>(kb + T::kKBytes, T::kKBlock, v_head, v_stride,
                                              kt * kKeyTile, seq, a.dvd / 8, l.tid);
  };
  load_swizzled<kRows, QK / 8, kThreads>(q_s, T::kQBlock, q_head, qk_stride, qt * kRows, seq,
                                         a.dqk / 8, l.tid);
  load_swizzled<kRows, VD / 8, kThreads>(do_s, T::kQBlock, do_head, v_stride, qt * kRows, seq,
                                         a.dvd / 8, l.tid);
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {  // Q and dO ride in the first group
    if (i < tiles) load_tile(i);
    cp_async_commit();
  }
  // The lane's rows' statistics, read while the tiles load. A row past the sequence gets
  // lse = +inf: its weights are exp2(-inf) = 0.
  const int64_t stat0 = (int64_t(l.b) * H + l.h) * seq;
  const float l2[2] = {row0 < seq ? a.lse[stat0 + row0] * kLog2e : INFINITY,
                       row1 < seq ? a.lse[stat0 + row1] * kLog2e : INFINITY};
  const float d[2] = {row0 < seq ? a.delta[stat0 + row0] : 0.0f,
                      row1 < seq ? a.delta[stat0 + row1] : 0.0f};

  float dq_acc[QK / 2], s[kKeyTile / 2], dp[kKeyTile / 2];
  uint32_t dsf[kKeyTile / 16][4];
  zero(dq_acc);
  zero(s);
  zero(dp);
  const uint32_t q_wg = q_s + 64 * 128 * l.wg, do_wg = do_s + 64 * 128 * l.wg;
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();
    __syncthreads();
    if (kt + STAGES - 1 < tiles) load_tile(kt + STAGES - 1);
    cp_async_commit();
    const uint32_t kb = stage0 + (kt % STAGES) * T::kStageBytes, vb = kb + T::kKBytes;

    wgmma_fence();
    wgmma_tiles<kKeyTile, QK>(s, q_wg, T::kQBlock, kb, T::kKBlock);    // S = Q K^T
    wgmma_tiles<kKeyTile, VD>(dp, do_wg, T::kQBlock, vb, T::kKBlock);  // dP = dO V^T
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_operands(s);
    wgmma_fence_operands(dp);
    // dS; the query is the row. Masked where the tile reaches past the warp's first row (keys
    // past the sequence are past every real row, so masked there too).
    const bool masked = kt * kKeyTile + kKeyTile - 1 > wrow;
#pragma unroll
    for (int j = 0; j < kKeyTile / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = kt * kKeyTile + 8 * j + 2 * l.t + e;
        weights(s[4 * j + e], dp[4 * j + e], l2[0], d[0], a.scale_log2, a.scale,
                !masked || key <= row0);
        weights(s[4 * j + 2 + e], dp[4 * j + 2 + e], l2[1], d[1], a.scale_log2, a.scale,
                !masked || key <= row1);
      }
    to_fragments<kKeyTile>(dsf, dp);

    wgmma_fence();
    wgmma_regs_mn<QK, kKeyTile>(dq_acc, dsf, kb, T::kKBlock);  // dQ += dS K
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_operands(dq_acc);
    wgmma_fence_operands(dsf);
  }
  cp_async_wait_all();
  store_acc<QK>(a.dq, dq_acc, l.tok0, row0, seq, H, l.h, a.dqk, l.t);
#else
  __trap();
#endif
}

template <int QK, int VD, int V>
cudaError_t launch(const FlashBwdArgs& args, int64_t batch) {
  using KV = DkdvTiles<QK, VD, V>;
  using Q = DqTiles<QK, VD, V>;
  static const cudaError_t attr = [] {
    const cudaError_t e =
        cudaFuncSetAttribute(reinterpret_cast<const void*>(&flash_dkdv_hopper_kernel<QK, VD, V>),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, int(KV::bytes()));
    if (e != cudaSuccess) return e;
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(&flash_dq_hopper_kernel<QK, VD, V>),
                                cudaFuncAttributeMaxDynamicSharedMemorySize, int(Q::bytes()));
  }();
  if (attr != cudaSuccess) return attr;
  const dim3 grid(unsigned((args.seq + block_rows<V> - 1) / block_rows<V>), unsigned(args.heads),
                  unsigned(batch));
  flash_dkdv_hopper_kernel<QK, VD, V><<<grid, block_threads<V>, KV::bytes(), stream()>>>(args);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  flash_dq_hopper_kernel<QK, VD, V><<<grid, block_threads<V>, Q::bytes(), stream()>>>(args);
  return cudaGetLastError();
}

template <int V>
cudaError_t launch_dims(const FlashBwdArgs& args, int64_t batch) {
  if (args.dqk <= 64 && args.dvd <= 64) return launch<64, 64, V>(args, batch);
  if (args.dqk <= 128 && args.dvd <= 128) return launch<128, 128, V>(args, batch);
  return launch<192, 128, V>(args, batch);
}

}  // namespace

bool flash_attention_backward_hopper_supported(int dqk, int dv) {
  return flash_attention_hopper_available() && dqk >= 16 && dv >= 16 && dqk % 16 == 0 &&
         dv % 16 == 0 && ((dqk <= 128 && dv <= 128) || (dqk <= 192 && dv <= 128));
}

cudaError_t flash_attention_backward_hopper(const FlashBwdArgs& args, int64_t batch, int tiling) {
  if (batch * args.seq * args.heads == 0) return cudaSuccess;
  if (!flash_attention_backward_hopper_supported(args.dqk, args.dvd) || tiling < 0 ||
      tiling >= kHopperBwdTilings)
    return cudaErrorInvalidValue;
  switch (tiling) {
    case 0:
      return launch_dims<0>(args, batch);
    case 1:
      return launch_dims<1>(args, batch);
    default:
      return launch_dims<2>(args, batch);
  }
}

}  // namespace moekit::cuda
