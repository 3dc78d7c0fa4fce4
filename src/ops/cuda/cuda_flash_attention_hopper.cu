// CUDA kernels, part 5e: the causal flash-attention forward on Hopper's warpgroup MMA (wgmma,
// sm_90a), the default forward of Precision::Bf16 on an H100/H200 (cuda_flash_attention.cu picks
// it: variants 5-10 of MOEKIT_FLASH_FWD_VARIANT, tilings 0-5 here). Same contract and numerics as
// the mma.sync kernel there: q, k, v bf16, S = Q K^T with fp32 accumulation, an online base-2
// softmax in fp32, P rounded to bf16 as the A operand of P V, fp32 accumulation of O, one
// division by the row sum at the end, lse in natural log; deterministic (fixed orders, no
// atomics). The weights round differently from that kernel's (one FMA per score here).
//
// Why a second kernel: on Hopper mma.sync runs at about two thirds of the tensor cores' rate and
// every B fragment passes through registers by ldmatrix (shared-memory bandwidth bounds it at
// ~115-150 TFLOP/s for 192/128 heads). wgmma reads K and V straight from shared memory, takes P
// from registers (the S accumulator layout is the A fragment layout: no exchange), and runs
// asynchronously, so the tensor cores can work while the softmax runs.
//
// Block (query tile of 64 rows per warpgroup, head, sequence x v-column chunk of 128); warpgroup
// w owns rows [64w, 64w + 64) of the tile (one m64 wgmma), warp i of it rows 16i.. as in the
// mma.sync kernel. Q is staged once; K and V tiles of BN keys stream through cp.async buffers
// (all threads load, zero-filled past the sequence) in the 128-byte-swizzled layout of
// wgmma_util.cuh. Per key tile a warpgroup issues dqk / 16 wgmmas for S (m64 x BN x 16), runs the
// softmax on its registers, then issues BN / 16 wgmmas for O += P V (V MN-major). Three schedules
// (see each kernel): plain (wait after each product), pipelined (S of the next tile in flight
// during this tile's softmax) and warp-specialised (a TMA producer warp, consumers taking turns at
// the tensor cores). Only tiles reaching past a row are masked.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_args.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/mma_util.cuh"
#include "ops/cuda/tma_util.cuh"
#include "ops/cuda/wgmma_util.cuh"

namespace moekit::cuda {

namespace {

// Dynamic shared memory: 1024 bytes of slack to align the tiles to the swizzle's period, the Q
// tile (64 rows per warpgroup), STAGES K and V buffers (each a row of 64-column blocks).
template <int QK, int VC, int BN, int WGS, int STAGES>
constexpr size_t hopper_smem_bytes() {
  return 1024 + (size_t(64 * WGS) * QK + STAGES * size_t(BN) * (QK + VC)) * sizeof(uint16_t);
}

// What a block works on and where its tiles live; the same for both kernels below. Warpgroup wg
// owns query rows [wg_row, wg_row + 64), warp `warp` of it 16 of them, and the lane rows row0 and
// row1 = row0 + 8 (the accumulator layout of wgmma_util.cuh).
template <int QK, int VC, int BN, int WGS, int STAGES>
struct HopperBlock {
  static constexpr int kBM = 64 * WGS, kThreads = 128 * WGS;  // query rows, threads per block
  static constexpr uint32_t kQBlockBytes = kBM * 128, kTileBlockBytes = BN * 128;  // 64 columns
  static constexpr uint32_t kKBytes = QK / 64 * kTileBlockBytes,
                            kVBytes = VC / 64 * kTileBlockBytes;
  static_assert(QK % 64 == 0 && QK <= 256 && (VC == 64 || VC == 128) && (BN == 64 || BN == 128));
  static_assert(hopper_smem_bytes<QK, VC, BN, WGS, STAGES>() <= 227 * 1024);

  const FlashArgs& a;
  uint32_t q_s, k_s, v_s;  // shared addresses: Q tile, K buffers, V buffers
  int qt, h, b, chunk, c0, nv, tid, wg, t, wg_row, wrow, row0, row1, tiles, wg_tiles;
  int64_t tok0;
  // Q, K and V of this sequence and head at token 0 (rows H * d apart). Pieces of 16 bytes per
  // q/k row: dqk / 8 hold data, the rest up to QK / 8 are zero, so that the S loop runs QK / 16
  // k-steps with no condition (a data-dependent skip there makes ptxas fence every wgmma) and the
  // zero columns add nothing; likewise v's nv / 8 of VC / 8.
  const uint16_t *q_head, *k_head, *v_head;
  int64_t qk_stride, v_stride;

  // thread: this thread's index among the block's consumers of the tiles (threadIdx.x, or less
  // the producer warpgroup's 128 in the warp-specialised kernel). tiles_last: the grid is (heads,
  // sequences x chunks, query tiles) instead of (query tiles, heads, sequences x chunks).
  __device__ HopperBlock(const FlashArgs& args, uint32_t smem, int thread, bool tiles_last = false)
      : a(args) {
    q_s = (smem + 1023u) & ~1023u;
    k_s = q_s + QK / 64 * kQBlockBytes;
    v_s = k_s + STAGES * kKBytes;
    // The longest tiles first (blocks start in the order of their linear index, x fastest).
    const int tile_index = tiles_last ? int(blockIdx.z) : int(blockIdx.x);
    const int tile_count = tiles_last ? int(gridDim.z) : int(gridDim.x);
    const int seq_chunk = tiles_last ? int(blockIdx.y) : int(blockIdx.z);
    qt = tile_count - 1 - tile_index;
    h = tiles_last ? int(blockIdx.x) : int(blockIdx.y);
    b = seq_chunk / a.chunks;
    chunk = seq_chunk % a.chunks;
    c0 = chunk * VC;
    nv = min(VC, a.dv - c0);  // this block's v columns [c0, c0 + nv)
    tid = thread;
    wg = tid / 128;
    const int warp = (tid % 128) / 32, lane = tid % 32;
    t = lane % 4;
    wg_row = qt * kBM + wg * 64;
    wrow = wg_row + warp * 16;
    row0 = wrow + lane / 4;
    row1 = row0 + 8;
    tok0 = int64_t(b) * a.seq;
    // Key tiles up to the block's last row; the warpgroup's own end (a warpgroup skips tiles
    // wholly past its rows; tiles are visited in order, so these are the last ones).
    tiles = min(((qt + 1) * kBM + BN - 1) / BN, (a.seq + BN - 1) / BN);
    wg_tiles = min(tiles, (wg_row + 63) / BN + 1);
    q_head = a.q + (tok0 * a.heads + h) * a.dqk;
    k_head = a.k + (tok0 * a.heads + h) * a.dqk;
    v_head = a.v + (tok0 * a.heads + h) * a.dv + c0;
    qk_stride = int64_t(a.heads) * a.dqk;
    v_stride = int64_t(a.heads) * a.dv;
  }
  // The Q tile, rows past the sequence zero.
  __device__ void load_q() const {
    load_swizzled<kBM, QK / 8, kThreads>(q_s, kQBlockBytes, q_head, qk_stride, qt * kBM, a.seq,
                                         a.dqk / 8, tid);
  }
  // Stages key tile kt into its buffer: rows past the sequence are zero (their scores are masked
  // for every real row; zero V keeps 0 * garbage out of the padding rows).
  __device__ void load_tile(int kt) const {
    const int buf = kt % STAGES;
    load_swizzled<BN, QK / 8, kThreads>(k_s + buf * kKBytes, kTileBlockBytes, k_head, qk_stride,
                                        kt * BN, a.seq, a.dqk / 8, tid);
    load_swizzled<BN, VC / 8, kThreads>(v_s + buf * kVBytes, kTileBlockBytes, v_head, v_stride,
                                        kt * BN, a.seq, nv / 8, tid);
  }

  // Issues S = Q K^T of key tile kt for the warpgroup's 64 rows x BN keys (one commit group):
  // columns 8j + 2t (+1) of s[4j..4j+3] are keys kt * BN + 8j + 2t (+1), rows row0 (s[4j],
  // s[4j + 1]) and row1 (+2, +3).
  __device__ void issue_scores(float (&s)[BN / 2], int kt) const {
    wgmma_fence();
    wgmma_tiles<BN, QK>(s, q_s + wg * 64 * 128, kQBlockBytes, k_s + (kt % STAGES) * kKBytes,
                        kTileBlockBytes);
    wgmma_commit();
  }
  // Issues O += P V of key tile kt (one commit group). V's tile is MN-major for this product
  // (rows = keys = k, 64 columns per 128-byte row): a k-step is 16 rows (2048 bytes) on, the next
  // 64 columns a whole block (BN rows) on.
  __device__ void issue_pv(float (&o)[VC / 2], const uint32_t (&p)[BN / 16][4], int kt) const {
    wgmma_fence();
    wgmma_regs_mn<VC, BN>(o, p, v_s + (kt % STAGES) * kVBytes, kTileBlockBytes);
    wgmma_commit();
  }
};

// The lane's online-softmax state for rows row0, row1: running max of the base-2 scaled scores
// and this lane's part of the running sums.
struct SoftmaxRows {
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
};

// One key tile (first key key0) of the online softmax, in three steps that the warp-specialised
// kernel runs apart (P V of the previous tile is in flight between them; online_softmax runs all
// three). softmax_scores masks keys past the row where the tile reaches past the warp's first row
// (uniform over the warp: only diagonal tiles pay for it), updates the running max and sums, turns
// s into the unnormalised weights in place and returns the factors (alpha0, alpha1) that rescale
// the rows' accumulators. The scale is positive, so the max of the raw scores is taken and scaled
// once; each weight is then one fused multiply-add and one ex2 (instruction count is what bounds
// this loop). Tile 0 holds key 0, which no row precedes, so the running max is finite from the
// first tile on (a fully masked row of a later tile gets exp2(-inf) = 0).
template <int BN>
__device__ inline float2 softmax_scores(float (&s)[BN / 2], SoftmaxRows& r, int key0, int wrow,
                                        int row0, int row1, int t, float sl2) {
  if (key0 + BN - 1 > wrow) {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = key0 + 8 * j + 2 * t + e;
        if (key > row0) s[4 * j + e] = -INFINITY;
        if (key > row1) s[4 * j + 2 + e] = -INFINITY;
      }
  }
  // The row maxima and sums in kChains independent partial results each, combined at the end:
  // with two warps per scheduler there is little to hide a dependent chain behind, and one
  // accumulator per row made each a chain of 2 * BN / 8 operations (Nsight Compute: "wait", the
  // fixed-latency dependency stall, was the first stall reason). The max is exact in any order;
  // the sum's rounding changes in the last bits.
  constexpr int kChains = 4;
  static_assert((BN / 8) % kChains == 0);
  float mx0c[kChains], mx1c[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) mx0c[c] = mx1c[c] = -INFINITY;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    mx0c[j % kChains] = fmaxf(mx0c[j % kChains], fmaxf(s[4 * j], s[4 * j + 1]));
    mx1c[j % kChains] = fmaxf(mx1c[j % kChains], fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  const float mx0 = fmaxf(fmaxf(mx0c[0], mx0c[1]), fmaxf(mx0c[2], mx0c[3]));
  const float mx1 = fmaxf(fmaxf(mx1c[0], mx1c[1]), fmaxf(mx1c[2], mx1c[3]));
  const float mn0 = fmaxf(r.m0, quad_max(mx0) * sl2), mn1 = fmaxf(r.m1, quad_max(mx1) * sl2);
  const float alpha0 = fast_exp2(r.m0 - mn0), alpha1 = fast_exp2(r.m1 - mn1);
  r.m0 = mn0;
  r.m1 = mn1;
  float sum0c[kChains] = {}, sum1c[kChains] = {};
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[4 * j + e] = fast_exp2(fmaf(s[4 * j + e], sl2, -mn0));
      s[4 * j + 2 + e] = fast_exp2(fmaf(s[4 * j + 2 + e], sl2, -mn1));
      sum0c[j % kChains] += s[4 * j + e];
      sum1c[j % kChains] += s[4 * j + 2 + e];
    }
  const float sum0 = (sum0c[0] + sum0c[1]) + (sum0c[2] + sum0c[3]);
  const float sum1 = (sum1c[0] + sum1c[1]) + (sum1c[2] + sum1c[3]);
  r.l0 = r.l0 * alpha0 + sum0;
  r.l1 = r.l1 * alpha1 + sum1;
  return make_float2(alpha0, alpha1);
}

// o's rows times alpha. Once the running max settles most tiles leave it unchanged (alpha = 1)
// for every row of the warp; skipping the multiply by 1 then is exact and saves VC / 2
// instructions.
template <int VC>
__device__ inline void rescale_rows(float (&o)[VC / 2], float2 alpha) {
  if (__any_sync(0xffffffffu, alpha.x != 1.0f || alpha.y != 1.0f)) {
#pragma unroll
    for (int j = 0; j < VC / 8; ++j) {
      o[4 * j] *= alpha.x;
      o[4 * j + 1] *= alpha.x;
      o[4 * j + 2] *= alpha.y;
      o[4 * j + 3] *= alpha.y;
    }
  }
}

// The weights as the A fragments of P V: k-step kk covers keys 16kk..16kk+15 = S columns 8(2kk)
// and 8(2kk + 1), so p[kk][i] packs s[8kk + 2i], s[8kk + 2i + 1] (rows g, g + 8, g, g + 8; keys
// +0, +0, +8, +8).
template <int BN>
__device__ inline void pack_weights(const float (&s)[BN / 2], uint32_t (&p)[BN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) p[kk][i] = pack_bf16(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
}

template <int BN, int VC>
__device__ inline void online_softmax(float (&s)[BN / 2], float (&o)[VC / 2],
                                      uint32_t (&p)[BN / 16][4], SoftmaxRows& r, int key0, int wrow,
                                      int row0, int row1, int t, float sl2) {
  rescale_rows<VC>(o, softmax_scores<BN>(s, r, key0, wrow, row0, row1, t, sl2));
  pack_weights<BN>(s, p);
}

// out = O / l (the quad's partial sums added in a fixed tree); lse = ln 2 * (m + log2 l).
template <class Block, int VC>
__device__ inline void store_output(const Block& k, const float (&o)[VC / 2], SoftmaxRows r) {
  const FlashArgs& a = k.a;
  const float l0 = quad_sum(r.l0), l1 = quad_sum(r.l1);
  const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
  auto store_pair = [&](int row, int col, float lo, float hi) {
    const int64_t i = ((k.tok0 + row) * a.heads + k.h) * a.dv + col;
    if (a.out_bf16)
      *reinterpret_cast<uint32_t*>(static_cast<bf16_t*>(a.out) + i) = pack_bf16(lo, hi);
    else
      *reinterpret_cast<float2*>(static_cast<float*>(a.out) + i) = make_float2(lo, hi);
  };
#pragma unroll
  for (int j = 0; j < VC / 8; ++j) {
    if (j * 8 >= k.nv) continue;
    const int col = k.c0 + j * 8 + 2 * k.t;
    if (k.row0 < a.seq) store_pair(k.row0, col, o[4 * j] * inv0, o[4 * j + 1] * inv0);
    if (k.row1 < a.seq) store_pair(k.row1, col, o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
  }
  if (k.chunk == 0 && k.t == 0) {
    float* lse = a.lse + (int64_t(k.b) * a.heads + k.h) * a.seq;
    if (k.row0 < a.seq) lse[k.row0] = (r.m0 + log2f(l0)) * kLn2;
    if (k.row1 < a.seq) lse[k.row1] = (r.m1 + log2f(l1)) * kLn2;
  }
}

// QK: dqk rounded up to a multiple of 64; VC: v columns per block, the N of the P V wgmma (64 or
// 128; columns past the chunk's nv computed from unused shared memory and not stored); BN: keys
// per tile, the N of the S wgmma (64 or 128); WGS: warpgroups.
//
// The plain schedule: K/V double-buffered; per tile a warpgroup issues S, waits, runs the softmax,
// issues P V, waits; two barriers per tile (tile landed; buffer free for the next prefetch). The
// tensor cores idle while both warpgroups run their softmax at the same time.
template <int QK, int VC, int BN, int WGS>
__global__ void __launch_bounds__(128 * WGS, 1) flash_attention_hopper_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const HopperBlock<QK, VC, BN, WGS, 2> k(a, shared_address(smem_raw), int(threadIdx.x));
  float o[VC / 2], s[BN / 2];
  uint32_t p[BN / 16][4];
#pragma unroll
  for (int i = 0; i < VC / 2; ++i) o[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) s[i] = 0.0f;
  SoftmaxRows r;

  k.load_q();
  k.load_tile(0);
  cp_async_commit();
  for (int kt = 0; kt < k.tiles; ++kt) {
    // Prefetch the next tile into the other buffer (always commit, so that "all but the newest
    // group done" means tile kt has landed); that buffer was last read one tile ago, before the
    // barrier at the end of the previous iteration.
    if (kt + 1 < k.tiles) k.load_tile(kt + 1);
    cp_async_commit();
    cp_async_wait_one();
    fence_proxy_async();  // the copies are read by wgmma's async proxy
    __syncthreads();
    if (kt < k.wg_tiles) {  // uniform over the warpgroup (wgmma is warpgroup-collective)
      k.issue_scores(s, kt);
      wgmma_wait_all();
      wgmma_fence_operands(s);
      online_softmax<BN, VC>(s, o, p, r, kt * BN, k.wrow, k.row0, k.row1, k.t, a.scale_log2);
      k.issue_pv(o, p, kt);
      wgmma_wait_all();
      wgmma_fence_operands(o);
      wgmma_fence_operands(p);
    }
    __syncthreads();  // the next prefetch overwrites this buffer
  }
  store_output<decltype(k), VC>(k, o, r);
#else
  __trap();  // built without sm_90a: flash_attention_hopper_available() is false
#endif
}

// The pipelined schedule (as FlashAttention-3's intra-warpgroup overlap): a warpgroup issues S
// of tile kt + 1 before it runs the softmax of tile kt, and P V of tile kt is still running when
// it moves on, so the tensor cores have work while the softmax runs. Two S accumulators
// alternate (the loop is unrolled by two so they stay in fixed registers). Four K/V buffers and
// one barrier per tile: tile kt + 2 is loaded into the buffer of tile kt - 2, whose last reader
// (P V of kt - 2) every warpgroup waited for before the barrier. Every warpgroup runs every tile
// of the block (the first warpgroup's last 64-key tile is all masked: its weights are exp2(-inf)
// = 0, its rescale 1): no branch may separate a wgmma from its wait, or ptxas serializes them all.
template <int QK, int VC, int BN>
__global__ void __launch_bounds__(256, 1)
    flash_attention_hopper_pipelined_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const HopperBlock<QK, VC, BN, 2, 4> k(a, shared_address(smem_raw), int(threadIdx.x));
  float o[VC / 2], sa[BN / 2], sb[BN / 2];
  uint32_t p[BN / 16][4];
#pragma unroll
  for (int i = 0; i < VC / 2; ++i) o[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) sa[i] = sb[i] = 0.0f;
  SoftmaxRows r;

  k.load_q();
  k.load_tile(0);
  cp_async_commit();
  if (k.tiles > 1) k.load_tile(1);
  cp_async_commit();
  cp_async_wait_one();  // Q and tile 0
  fence_proxy_async();
  __syncthreads();
  k.issue_scores(sa, 0);

  // Tile kt lands in the buffers: wait for this thread's copies, make them visible to wgmma,
  // then prefetch tile kt + 2 over tile kt - 2.
  auto arrive = [&](int kt) {
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    if (kt + 2 < k.tiles) k.load_tile(kt + 2);
    cp_async_commit();
  };
  // The softmax of tile kt (its scores in `cur`, waited for) and the issue of its P V.
  auto consume = [&](int kt, float(&cur)[BN / 2]) {
    wgmma_fence_operands(cur);
    wgmma_fence_operands(o);
    wgmma_fence_operands(p);
    online_softmax<BN, VC>(cur, o, p, r, kt * BN, k.wrow, k.row0, k.row1, k.t, a.scale_log2);
    k.issue_pv(o, p, kt);
  };
  // Tile kt whose scores are in `cur`, with a next tile (its scores issued into `nxt`).
  auto step = [&](int kt, float(&cur)[BN / 2], float(&nxt)[BN / 2]) {
    arrive(kt);
    k.issue_scores(nxt, kt + 1);
    wgmma_wait<1>();  // S of kt and P V of kt - 1; S of kt + 1 runs on
    consume(kt, cur);
  };
  // The last tile: nothing left to overlap.
  auto last = [&](int kt, float(&cur)[BN / 2]) {
    arrive(kt);
    wgmma_wait_all();
    consume(kt, cur);
    wgmma_wait_all();
    wgmma_fence_operands(o);
    wgmma_fence_operands(p);
  };
  int kt = 0;
  for (; kt + 2 < k.tiles; kt += 2) {
    step(kt, sa, sb);
    step(kt + 1, sb, sa);
  }
  if (kt + 1 < k.tiles) {
    step(kt, sa, sb);
    last(kt + 1, sb);
  } else {
    last(kt, sa);
  }
  store_output<decltype(k), VC>(k, o, r);
#else
  __trap();  // built without sm_90a: flash_attention_hopper_available() is false
#endif
}

// The warp-specialised schedule (FlashAttention-3's design on the same tiles): a producer
// warpgroup, of which one thread issues the TMA copies of Q once and of each key tile's K and V
// into a ring of STAGES buffers, and two consumer warpgroups of 64 query rows each.
//  - No consumer instruction goes to loading: a tile's K and V each complete an mbarrier ("full")
//    by their bytes, and the consumers free them through another ("empty", one arrival per
//    consumer warp): K once its S is done, V once its P V is. The copies run up to STAGES tiles
//    ahead with no block-wide barrier.
//  - Within a warpgroup (as the pipelined kernel): the S of tile kt and the P V of tile kt - 1
//    are issued together, and the softmax of tile kt runs while that P V is in flight.
//  - Between the warpgroups (ping-pong): a warpgroup issues its two products only in its turn
//    (named barrier 1 + its index, passed by the other warpgroup once that one has issued), so
//    one warpgroup's softmax runs while the other's products keep the tensor cores busy.
// Both consumers run every key tile of the block (with 64-key tiles the first one's last is all
// masked), so their turns alternate to the end. Q, K and V are read through 4-D tensor maps
// [batch, seq, heads, dim] in boxes of 64 columns: rows past the sequence and columns past the
// head's dim are zeros, as the cp.async kernels fill them.
struct FlashMaps {
  TensorMap q, k, v;
};

template <int QK, int VC, int BN>
struct WsShape {
  static constexpr size_t kQBytes = size_t(128) * QK * 2, kStageBytes = size_t(BN) * (QK + VC) * 2;
  static constexpr size_t kBudget = 227 * 1024 - 1024 - 256;  // less alignment and barriers
  static constexpr int kFit = int((kBudget - kQBytes) / kStageBytes);  // buffers that fit
  static constexpr int kStages = kFit < 4 ? kFit : 4;
  static_assert(kStages >= 2, "two K/V buffers at least");
  static constexpr size_t kSmem = 1024 + kQBytes + kStages * kStageBytes + 256;
};

template <int QK, int VC, int BN, bool TilesLast>
__global__ void __launch_bounds__(384, 1)
    flash_attention_hopper_ws_kernel(const __grid_constant__ FlashMaps maps, const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = WsShape<QK, VC, BN>;
  constexpr int S = Shape::kStages;
  extern __shared__ uint8_t smem_raw[];
  const int producer = int(threadIdx.x) < 128;
  const HopperBlock<QK, VC, BN, 2, S> k(a, shared_address(smem_raw),
                                        producer ? 0 : int(threadIdx.x) - 128, TilesLast);
  static_assert(decltype(k)::kThreads == 256, "two consumer warpgroups");
  // Barriers after the V buffers: q_full, then per stage k_full, k_empty, v_full, v_empty.
  const uint32_t bars = k.v_s + S * k.kVBytes, q_full = bars;
  auto bar = [&](int kind, int st) { return bars + 8u * uint32_t(1 + 4 * st + kind); };
  constexpr int kKFull = 0, kKEmpty = 1, kVFull = 2, kVEmpty = 3;
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int st = 0; st < S; ++st) {
      mbar_init(bar(kKFull, st), 1);
      mbar_init(bar(kVFull, st), 1);
      mbar_init(bar(kKEmpty, st), 8);  // the consumer warps
      mbar_init(bar(kVEmpty, st), 8);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int tiles = k.tiles;
  if (producer) {
    regs_release<40>();
    if (threadIdx.x != 0) return;
    // Q's second 64 rows may lie wholly past the sequence: not loaded then (those rows' results,
    // computed from stale shared memory, stay in their own rows and are not stored).
    const int q0 = k.qt * 128, halves = q0 + 64 < a.seq ? 2 : 1;
    mbar_arrive_expect_tx(q_full, uint32_t(Shape::kQBytes / 2 * halves));
    for (int j = 0; j < QK / 64; ++j)
      for (int half = 0; half < halves; ++half)
        tma_load_4d(k.q_s + j * k.kQBlockBytes + half * 64 * 128, &maps.q, q_full, 64 * j, k.h,
                    q0 + 64 * half, k.b);
    for (int kt = 0; kt < tiles; ++kt) {
      const int st = kt % S;
      const uint32_t parity = ((kt / S) & 1) ^ 1u;  // a fresh ring: the first pass does not wait
      mbar_wait(bar(kKEmpty, st), parity);
      mbar_arrive_expect_tx(bar(kKFull, st), uint32_t(BN * QK * 2));
      for (int j = 0; j < QK / 64; ++j)
        tma_load_4d(k.k_s + st * k.kKBytes + j * k.kTileBlockBytes, &maps.k, bar(kKFull, st),
                    64 * j, k.h, kt * BN, k.b);
      // V's 64-column blocks holding columns of this chunk (a block wholly past them is not
      // loaded: its products are never stored).
      const int vblocks = (k.nv + 63) / 64;
      mbar_wait(bar(kVEmpty, st), parity);
      mbar_arrive_expect_tx(bar(kVFull, st), uint32_t(BN * 64 * 2 * vblocks));
      for (int j = 0; j < vblocks; ++j)
        tma_load_4d(k.v_s + st * k.kVBytes + j * k.kTileBlockBytes, &maps.v, bar(kVFull, st),
                    k.c0 + 64 * j, k.h, kt * BN, k.b);
    }
    return;
  }
  regs_claim<232>();
  const int me = k.wg, other = 1 - me;  // this consumer's index and the other's
  const int lane = k.tid % 32;
  auto my_turn = [&] { named_barrier_sync(1 + me, 256); };
  auto pass_turn = [&] { named_barrier_arrive(1 + other, 256); };
  auto release = [&](int kind, int st) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar(kind, st));
  };
  auto full_parity = [&](int kt) { return uint32_t((kt / S) & 1); };
  float o[VC / 2], s[BN / 2];
  uint32_t p[BN / 16][4];
#pragma unroll
  for (int i = 0; i < VC / 2; ++i) o[i] = 0.0f;
  SoftmaxRows r;
  if (me == 1) pass_turn();  // the first consumer issues first
  mbar_wait(q_full, 0);

  // Tile 0: S alone.
  mbar_wait(bar(kKFull, 0), 0);
  my_turn();
  k.issue_scores(s, 0);
  pass_turn();
  wgmma_wait_all();
  wgmma_fence_operands(s);
  release(kKEmpty, 0);
  float2 alpha = softmax_scores<BN>(s, r, 0, k.wrow, k.row0, k.row1, k.t, a.scale_log2);
  pack_weights<BN>(s, p);
  for (int kt = 1; kt < tiles; ++kt) {
    const int st = kt % S, prev = (kt - 1) % S;
    mbar_wait(bar(kKFull, st), full_parity(kt));
    mbar_wait(bar(kVFull, prev), full_parity(kt - 1));
    my_turn();
    k.issue_scores(s, kt);
    rescale_rows<VC>(o, alpha);
    k.issue_pv(o, p, kt - 1);
    pass_turn();
    wgmma_wait<1>();  // S of tile kt; P V of kt - 1 runs on
    wgmma_fence_operands(s);
    release(kKEmpty, st);
    alpha = softmax_scores<BN>(s, r, kt * BN, k.wrow, k.row0, k.row1, k.t, a.scale_log2);
    wgmma_wait_all();  // P V of kt - 1: its weights' registers and V buffer are free
    wgmma_fence_operands(o);
    wgmma_fence_operands(p);
    release(kVEmpty, prev);
    pack_weights<BN>(s, p);
  }
  // The last tile's P V. The second consumer takes its turn but does not pass it: the first has
  // no turn left to take.
  const int last = tiles - 1;
  mbar_wait(bar(kVFull, last % S), full_parity(last));
  my_turn();
  rescale_rows<VC>(o, alpha);
  k.issue_pv(o, p, last);
  if (me == 0) pass_turn();
  wgmma_wait_all();
  wgmma_fence_operands(o);
  wgmma_fence_operands(p);
  store_output<decltype(k), VC>(k, o, r);
#else
  __trap();  // built without sm_90a: flash_attention_hopper_available() is false
#endif
}

// Sets the kernel's shared-memory allowance once and launches it: grid (query tiles, heads,
// sequences x v-column chunks).
template <int QK, int VC, int BN, int WGS, int STAGES>
cudaError_t launch_hopper_kernel(const void* kernel, void (*launch)(dim3, size_t, const FlashArgs&),
                                 const FlashArgs& args, int64_t batch) {
  constexpr size_t smem = hopper_smem_bytes<QK, VC, BN, WGS, STAGES>();
  static_assert(smem <= 227 * 1024, "over the opt-in shared memory of sm_90");
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(unsigned((args.seq + 64 * WGS - 1) / (64 * WGS)), unsigned(args.heads),
                  unsigned(batch * args.chunks));
  launch(grid, smem, args);
  return cudaGetLastError();
}

template <int QK, int VC, int BN, int WGS>
cudaError_t launch_hopper(const FlashArgs& args, int64_t batch) {
  return launch_hopper_kernel<QK, VC, BN, WGS, 2>(
      reinterpret_cast<const void*>(&flash_attention_hopper_kernel<QK, VC, BN, WGS>),
      [](dim3 grid, size_t smem, const FlashArgs& x) {
        flash_attention_hopper_kernel<QK, VC, BN, WGS><<<grid, 128 * WGS, smem, stream()>>>(x);
      },
      args, batch);
}

template <int QK, int VC, int BN>
cudaError_t launch_hopper_pipelined(const FlashArgs& args, int64_t batch) {
  return launch_hopper_kernel<QK, VC, BN, 2, 4>(
      reinterpret_cast<const void*>(&flash_attention_hopper_pipelined_kernel<QK, VC, BN>),
      [](dim3 grid, size_t smem, const FlashArgs& x) {
        flash_attention_hopper_pipelined_kernel<QK, VC, BN><<<grid, 256, smem, stream()>>>(x);
      },
      args, batch);
}

// The warp-specialised kernel: q, k and v as 4-D tensors [batch, seq, heads, dim] (dim
// contiguous) read in boxes of 64 columns x 64 (Q) or BN (K, V) rows of one head.
// cudaErrorNotSupported where TMA cannot describe them (encode_bf16_tensor_map fails).
template <int QK, int VC, int BN, bool TilesLast = false>
cudaError_t launch_hopper_ws(const FlashArgs& args, int64_t batch) {
  using Shape = WsShape<QK, VC, BN>;
  FlashMaps maps;
  auto encode = [&](TensorMap* map, const uint16_t* base, int d, uint32_t rows) {
    const uint64_t dims[4] = {uint64_t(d), uint64_t(args.heads), uint64_t(args.seq),
                              uint64_t(batch)};
    const uint64_t row = uint64_t(args.heads) * d * 2;
    const uint64_t strides[3] = {uint64_t(d) * 2, row, row * uint64_t(args.seq)};
    const uint32_t box[4] = {64, 1, rows, 1};
    return encode_bf16_tensor_map(map, base, 4, dims, strides, box) == cudaSuccess;
  };
  if (!encode(&maps.q, args.q, args.dqk, 64) || !encode(&maps.k, args.k, args.dqk, BN) ||
      !encode(&maps.v, args.v, args.dv, BN))
    return cudaErrorNotSupported;
  constexpr auto kernel = flash_attention_hopper_ws_kernel<QK, VC, BN, TilesLast>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmem));
  if (attr != cudaSuccess) return attr;
  const unsigned tiles = unsigned((args.seq + 127) / 128), heads = unsigned(args.heads),
                 seqs = unsigned(batch * args.chunks);
  const dim3 grid = TilesLast ? dim3(heads, seqs, tiles) : dim3(tiles, heads, seqs);
  kernel<<<grid, 384, Shape::kSmem, stream()>>>(maps, args);
  return cudaGetLastError();
}

// Whether every sequence's K and V (all heads) fit in half the L2 cache. Then the warp-specialised
// kernel's grid puts the query tiles last, so the longest tiles of every head start first and
// the last wave holds the shortest (batch 1 x 2048, 16 heads at 192/128: 0.077 ms against 0.095
// on the H200). Where they do not fit (batch 4: 84 MB), consecutive blocks sharing one head's K
// and V in L2 count for more (0.272 ms with the tiles first, 0.282 last).
bool kv_fits_l2(const FlashArgs& args, int64_t batch) {
  static const int64_t l2_bytes = current_device_attribute(cudaDevAttrL2CacheSize);
  const int64_t kv_bytes = batch * args.seq * int64_t(args.heads) * (args.dqk + args.dv) * 2;
  return kv_bytes <= l2_bytes / 2;
}

cudaError_t launch_ws(const FlashArgs& args, int64_t batch, bool wide_tiles, bool tiles_last) {
  if (args.dqk <= 64 && args.dv <= 64) return launch_hopper_ws<64, 64, 64>(args, batch);
  if (args.dqk <= 128)
    return wide_tiles ? launch_hopper_ws<128, 128, 128>(args, batch)
                      : launch_hopper_ws<128, 128, 64>(args, batch);
  if (args.dqk <= 192) {
    if (tiles_last) return launch_hopper_ws<192, 128, 128, true>(args, batch);
    return wide_tiles ? launch_hopper_ws<192, 128, 128>(args, batch)
                      : launch_hopper_ws<192, 128, 64>(args, batch);
  }
  return launch_hopper_ws<256, 128, 64>(args, batch);
}

}  // namespace

bool flash_attention_hopper_available() {
#if defined(MOEKIT_CUDA_WGMMA)
  // sm_90a code runs on compute capability 9.0 only; asked once per process (one device).
  static const bool hopper = current_device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
                             current_device_attribute(cudaDevAttrComputeCapabilityMinor) == 0;
  return hopper;
#else
  return false;
#endif
}

cudaError_t flash_attention_forward_hopper(const FlashArgs& args, int64_t batch, int tiling) {
  if (batch * args.seq * args.heads == 0) return cudaSuccess;
  if (!flash_attention_hopper_available() || tiling < 0 || tiling >= kHopperTilings)
    return cudaErrorInvalidValue;
  const bool small = args.dqk <= 64 && args.dv <= 64;
  // Tilings: 0 = pipelined, 2 warpgroups, 64-key tiles; 1 = plain, 2 warpgroups, 128 keys; 2 =
  // plain, 3 warpgroups (192 query rows per K/V tile, 12 warps to hide latency), 64 keys; 3 =
  // warp-specialised (TMA producer, ping-pong consumers), 64 keys; 4 = the same with 128 keys
  // where two K/V buffers fit (dqk <= 192), else 64, and its grid's order by kv_fits_l2; 5 = 4
  // with the query tiles last in the grid whatever the size (dqk 129..192).
  if (tiling >= 3) {  // tiling 0 where TMA cannot describe the tensors
    // (grid z takes at most 65535 query tiles: longer sequences keep them first)
    const bool tiles_last = (tiling == 5 || (tiling == 4 && kv_fits_l2(args, batch))) &&
                            (args.seq + 127) / 128 <= 65535;
    const cudaError_t ws = launch_ws(args, batch, tiling >= 4, tiles_last);
    if (ws != cudaErrorNotSupported) return ws;
    tiling = 0;
  }
  if (small) return launch_hopper_pipelined<64, 64, 64>(args, batch);
  if (args.dqk <= 128) return launch_hopper_pipelined<128, 128, 64>(args, batch);
  if (args.dqk <= 192) {
    if (tiling == 0) return launch_hopper_pipelined<192, 128, 64>(args, batch);
    if (tiling == 1) return launch_hopper<192, 128, 128, 2>(args, batch);
    return launch_hopper<192, 128, 64, 3>(args, batch);
  }
  return launch_hopper<256, 128, 64, 2>(args, batch);  // 4 stages would not fit
}

}  // namespace moekit::cuda
