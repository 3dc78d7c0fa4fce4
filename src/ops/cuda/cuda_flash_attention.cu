// CUDA kernels, part 5c: the causal attention forward of Precision::Bf16 as one fused
// flash-attention kernel on the bf16 tensor cores (host side: cuda_attention_tc.cpp, which keeps
// the cuBLAS path of cuda_attention_tc.cu as the fallback and for the backward). The GEMM path
// writes every fp32 score to memory and reads it back twice; here the scores never leave the SM:
// a block owns 64 query rows of one head, streams the keys in tiles of 64 through shared memory,
// and keeps S, P, the running softmax statistics and the output accumulator in registers.
//
// Numerics, as the GEMM path: q, k, v bf16 (rounded once by the caller), S = Q K^T with fp32
// accumulation, an online softmax in fp32 (base 2: scores pre-scaled by scale * log2(e)), P
// rounded to bf16 as the A operand of P V, fp32 accumulation of O, one division by the row sum at
// the end. lse is the natural-log log-sum-exp of the scaled scores, [batch, heads, seq], what the
// backward recomputes P from. out is fp32, or bf16 (out_bf16: the same fp32 values rounded to
// nearest even as they are stored, for an output that only bf16 GEMMs and the backward's delta
// read). Deterministic: fixed loop orders and shuffle trees, no atomics.
//
// Block (query tile, head, sequence x v-column chunk), `warps` warps, warp w owning query rows
// [16w, 16w + 16) of the tile. The tiles are launched last-first (the last one has the most keys).
// Key tiles up to the block's last row are visited (causal); only tiles that reach past a warp's
// first row are masked, and a warp skips tiles wholly past its rows. K and V tiles are staged with
// cp.async (zero-filled past the sequence's end). v's columns are split into chunks of VC (128; 64
// for small heads) per block so the accumulator fits in registers at dv = 256 too.
//
// Variants (MOEKIT_FLASH_FWD_VARIANT, read per call): 0-4 are this kernel's (kFwdVariants), 5-10
// the wgmma kernels of cuda_flash_attention_hopper.cu (its tilings 0-5). Unset or out of range: 9
// (the warp-specialised kernel, 128-key tiles) where the build and the device have the Hopper
// kernels, else 1 (the fastest here).
// Every variant computes the same thing within rounding (different key tiles rescale the running
// sums at other points) and each is deterministic. What they trade, at 192/128 (ptxas, sm_90):
//  0  4 warps (64 rows), 64-key tiles, Q in registers, 2 K/V buffers: the original kernel.
//     198 registers, 86 KB shared: 2 blocks (8 warps) per SM.
//  1  8 warps (128 rows), otherwise 0: each K/V tile staged once for twice the rows (half the
//     L2 -> shared traffic and load-loop instructions per mma), 1 block of 8 warps per SM (196
//     registers); at batch 1 half the blocks, so a worse tail.
//  2  4 warps, 32-key tiles, Q in shared memory (one more ldmatrix per k-step), capped at 168
//     registers for 3 blocks per SM (uses 126; 69 KB shared): 12 warps to hide latency.
//  3  8 warps, 32-key tiles, Q in registers, 3 K/V buffers: the buffer refilled at tile kt was
//     read at kt - 2, so one barrier per tile instead of two (178 registers, 65 KB).
//  4  8 warps, 32-key tiles, Q in shared memory, 2 blocks per SM (150 registers -> capped 128;
//     94 KB): 16 warps per SM.
// Within a warp all variants use the same mma shapes: ldmatrix per mma is 1/2 with Q in
// registers (K: 1 per 2 mma, V: 1 per 2) and a little more with Q in shared memory.
#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_args.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/mma_util.cuh"

namespace moekit::cuda {

namespace {

// A tiling/scheduling choice of the kernel (the variants of the header).
struct FwdCfg {
  int warps;       // each owns 16 query rows: 16 * warps rows per block
  int bn;          // keys per tile (64 or 32)
  bool q_regs;     // Q fragments in registers for the whole key loop (else in shared memory)
  int stages;      // K/V buffers: 2 (two barriers per tile) or 3 (one barrier per tile)
  int min_blocks;  // __launch_bounds__ blocks per SM (caps registers)
};
constexpr FwdCfg kFwdVariants[] = {
    {4, 64, true, 2, 1},   // 0: the original kernel
    {8, 64, true, 2, 1},   // 1: 128 query rows per block
    {4, 32, false, 2, 3},  // 2: Q in shared memory, 32-key tiles, 3 blocks per SM
    {8, 32, true, 3, 1},   // 3: 128 query rows, 32-key tiles, three buffers, one barrier
    {8, 32, false, 2, 2},  // 4: 128 query rows, Q in shared memory, 32-key tiles, 2 blocks/SM
};
constexpr int kFwdVariantCount = int(sizeof(kFwdVariants) / sizeof(kFwdVariants[0]));

template <int QK, int VC, int V>
constexpr size_t flash_smem_bytes() {
  constexpr FwdCfg C = kFwdVariants[V];
  const size_t q = C.q_regs ? 0 : size_t(16) * C.warps * (QK + kPad);
  return (q + size_t(C.stages) * C.bn * ((QK + kPad) + (VC + kPad))) * sizeof(uint16_t);
}

// QK: dqk rounded up to a multiple of 64 (the K tile's shared width; k-steps past dqk skipped).
// VC: v columns per block (n-tiles past the chunk's nv skipped). V: the variant.
template <int QK, int VC, int V>
__global__ void __launch_bounds__(kFwdVariants[V].warps * 32, kFwdVariants[V].min_blocks)
    flash_attention_kernel(const FlashArgs a) {
  constexpr FwdCfg C = kFwdVariants[V];
  constexpr int BM = 16 * C.warps, BN = C.bn, kThreads = 32 * C.warps;
  constexpr int kStride = QK + kPad, vStride = VC + kPad;  // shared row strides (elements)
  constexpr int kSteps = QK / 16, vTiles = VC / 8, sTiles = BN / 8;
  static_assert(BM % BN == 0 && (BN == 32 || BN == 64) && (C.stages == 2 || C.stages == 3));
  extern __shared__ __align__(16) uint16_t smem[];
  // [Q tile] then the K buffers, then the V buffers.
  uint16_t* const q_s = smem;
  uint16_t* const k_s = smem + (C.q_regs ? 0 : BM * kStride);
  uint16_t* const v_s = k_s + C.stages * BN * kStride;

  const int qt = int(gridDim.x) - 1 - int(blockIdx.x);  // the longest tiles first
  const int h = int(blockIdx.y), b = int(blockIdx.z) / a.chunks, chunk = int(blockIdx.z) % a.chunks;
  const int seq = a.seq, H = a.heads, dqk = a.dqk, dv = a.dv;
  const int c0 = chunk * VC, nv = min(VC, dv - c0);  // this block's v columns [c0, c0 + nv)
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  const int wrow = qt * BM + warp * 16;        // the warp's first row
  const int row0 = wrow + g, row1 = row0 + 8;  // the rows this lane holds
  const int64_t tok0 = int64_t(b) * seq;       // first token of the sequence
  // Key tiles up to the block's last row (or the sequence's last key).
  const int tiles = min((qt + 1) * (BM / BN), (seq + BN - 1) / BN);

  // Q fragments of the warp's 16 rows, kept in registers for the whole key loop (zero for rows
  // past the sequence and k-steps past dqk). Without q_regs the array is unused.
  uint32_t qf[C.q_regs ? kSteps : 1][4];
  if constexpr (C.q_regs) {
    const uint16_t* q0 = a.q + ((tok0 + row0) * H + h) * dqk + 2 * t;
    const uint16_t* q1 = a.q + ((tok0 + row1) * H + h) * dqk + 2 * t;
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      const bool in = kk * 16 < dqk;
      const bool r0 = in && row0 < seq, r1 = in && row1 < seq;
      qf[kk][0] = r0 ? *reinterpret_cast<const uint32_t*>(q0 + kk * 16) : 0u;
      qf[kk][1] = r1 ? *reinterpret_cast<const uint32_t*>(q1 + kk * 16) : 0u;
      qf[kk][2] = r0 ? *reinterpret_cast<const uint32_t*>(q0 + kk * 16 + 8) : 0u;
      qf[kk][3] = r1 ? *reinterpret_cast<const uint32_t*>(q1 + kk * 16 + 8) : 0u;
    }
  } else {
    // The block's Q tile joins the first K/V group (rows past the sequence zero).
    const int kc = dqk / 8;
    const uint32_t qd = shared_address(q_s);
    for (int i = int(threadIdx.x); i < BM * kc; i += kThreads) {
      const int r = i / kc, c = i % kc, j = qt * BM + r;
      const int64_t tok = tok0 + (j < seq ? j : 0);
      cp_async16(qd + uint32_t((r * kStride + c * 8) * 2), a.q + (tok * H + h) * dqk + c * 8,
                 j < seq);
    }
  }
  // A fragments of Q from shared memory at k-step kk: add 32 * kk bytes.
  const uint32_t q_a = shared_address(q_s + 16 * warp * kStride + frag_rows_offset(lane, kStride));

  // Stages key tile kt into buffer `buf`: rows past the sequence are zero (their scores are masked
  // for every real row; zero V keeps 0 * garbage out of the padding rows).
  auto load_tile = [&](int kt, int buf) {
    const int kc = dqk / 8, vc = nv / 8;  // 16-byte pieces per row
    const uint32_t kd = shared_address(k_s + buf * BN * kStride);
    const uint32_t vd = shared_address(v_s + buf * BN * vStride);
    for (int i = int(threadIdx.x); i < BN * kc; i += kThreads) {
      const int r = i / kc, c = i % kc, j = kt * BN + r;
      const int64_t tok = tok0 + (j < seq ? j : 0);
      cp_async16(kd + uint32_t((r * kStride + c * 8) * 2), a.k + (tok * H + h) * dqk + c * 8,
                 j < seq);
    }
    for (int i = int(threadIdx.x); i < BN * vc; i += kThreads) {
      const int r = i / vc, c = i % vc, j = kt * BN + r;
      const int64_t tok = tok0 + (j < seq ? j : 0);
      cp_async16(vd + uint32_t((r * vStride + c * 8) * 2), a.v + (tok * H + h) * dv + c0 + c * 8,
                 j < seq);
    }
  };

  // Per-lane ldmatrix offsets (elements), matrix i = lane / 8 and its row lane % 8:
  // K (non-transposed), for key n-tiles 2p, 2p+1 at k-step kk: matrix 0 = keys +0..7 x dims
  // +0..7 (b0 of n-tile 2p), 1 = keys +0..7 x dims +8..15 (b1 of 2p), 2 = keys +8..15 x dims
  // +0..7 (b0 of 2p+1), 3 = keys +8..15 x dims +8..15 (b1 of 2p+1): the thread gets
  // K[key g][dim 2t..2t+1] = B[2t..][g] of B = K^T.
  const int k_lane = frag_cols_offset(lane, kStride);
  // V (transposed), for k-step kk (keys 16kk..) and v n-tiles 2p, 2p+1: matrix 0 = keys +0..7 x
  // cols +0..7 (b0 of n-tile 2p), 1 = keys +8..15 x cols +0..7 (b1 of 2p), 2 = keys +0..7 x cols
  // +8..15 (b0 of 2p+1), 3 = keys +8..15 x cols +8..15 (b1 of 2p+1): with .trans the thread gets
  // V[key 2t..2t+1][col g] = B[2t..][g] of B = V.
  const int v_lane = frag_rows_offset(lane, vStride);

  float o[vTiles][4];
#pragma unroll
  for (int n = 0; n < vTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max (base-2 scaled scores) of rows 0, 1
  float l0 = 0.0f, l1 = 0.0f;            // this lane's part of the running row sums

  load_tile(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < tiles; ++kt) {
    // Prefetch the next tile into the next buffer (always commit, so that "all but the newest
    // group done" means tile kt has landed). With three buffers the one written here was last
    // read two tiles ago, before every thread passed the previous iteration's barrier, so no
    // barrier is needed after the compute; with two it is the one read one tile ago.
    if (kt + 1 < tiles) load_tile(kt + 1, (kt + 1) % C.stages);
    cp_async_commit();
    cp_async_wait_one();
    __syncthreads();
    // A warp whose rows all precede the tile skips it (every score masked). Tile 0 holds key 0,
    // which no row precedes, so the running max is finite from a warp's first tile on and its
    // first alpha is exp2(-inf) = 0.
    if (kt * BN <= wrow + 15) {
      const int buf = kt % C.stages;
      const uint32_t kb = shared_address(k_s + buf * BN * kStride + k_lane);
      const uint32_t vb = shared_address(v_s + buf * BN * vStride + v_lane);

      // S = Q K^T for the warp's 16 rows x BN keys: n-tile nt holds keys kt*BN + 8nt + 2t (+1)
      // in s[nt][0..1] (row0) and s[nt][2..3] (row1).
      float s[sTiles][4];
#pragma unroll
      for (int nt = 0; nt < sTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
        if (kk * 16 >= dqk) continue;
        uint32_t qa[4];
        if constexpr (C.q_regs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) qa[i] = qf[kk][i];
        } else {
          ldmatrix_x4(qa, q_a + uint32_t(kk * 16 * 2));
        }
#pragma unroll
        for (int p = 0; p < BN / 16; ++p) {
          uint32_t bk[4];
          ldmatrix_x4(bk, kb + uint32_t((16 * p * kStride + 16 * kk) * 2));
          mma_bf16(s[2 * p], qa, bk[0], bk[1]);
          mma_bf16(s[2 * p + 1], qa, bk[2], bk[3]);
        }
      }

      // Scale to base 2, mask keys past the row where the tile reaches past the warp's first
      // row, update the running max.
      const bool masked = kt * BN + BN - 1 > wrow;
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < sTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = kt * BN + 8 * nt + 2 * t + e;
          float x0 = s[nt][e] * a.scale_log2, x1 = s[nt][2 + e] * a.scale_log2;
          if (masked && key > row0) x0 = -INFINITY;
          if (masked && key > row1) x1 = -INFINITY;
          s[nt][e] = x0;
          s[nt][2 + e] = x1;
          mx0 = fmaxf(mx0, x0);
          mx1 = fmaxf(mx1, x1);
        }
      const float mn0 = fmaxf(m0, quad_max(mx0)), mn1 = fmaxf(m1, quad_max(mx1));
      const float alpha0 = exp2f(m0 - mn0), alpha1 = exp2f(m1 - mn1);
      m0 = mn0;
      m1 = mn1;
      float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
      for (int nt = 0; nt < sTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m0);  // masked: exp2(-inf) = 0
          s[nt][2 + e] = exp2f(s[nt][2 + e] - m1);
          sum0 += s[nt][e];
          sum1 += s[nt][2 + e];
        }
      l0 = l0 * alpha0 + sum0;
      l1 = l1 * alpha1 + sum1;
#pragma unroll
      for (int n = 0; n < vTiles; ++n) {
        o[n][0] *= alpha0;
        o[n][1] *= alpha0;
        o[n][2] *= alpha1;
        o[n][3] *= alpha1;
      }

      // O += P V. The accumulator layout of S is the A layout of the next mma: k-step kk covers
      // keys 16kk..16kk+15 = S n-tiles 2kk (keys +0..7) and 2kk+1 (keys +8..15), and
      //   a[0] = P[g][16kk + 2t..]         = s[2kk][0..1]
      //   a[1] = P[g + 8][16kk + 2t..]     = s[2kk][2..3]
      //   a[2] = P[g][16kk + 8 + 2t..]     = s[2kk + 1][0..1]
      //   a[3] = P[g + 8][16kk + 8 + 2t..] = s[2kk + 1][2..3]
      // so P goes to bf16 in registers, lane by lane, with no exchange.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                                pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int p = 0; p < VC / 16; ++p) {
          if (p * 16 >= nv) continue;
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, vb + uint32_t((16 * kk * vStride + 16 * p) * 2));
          mma_bf16(o[2 * p], pa, bv[0], bv[1]);
          mma_bf16(o[2 * p + 1], pa, bv[2], bv[3]);
        }
      }
    }
    if constexpr (C.stages == 2) __syncthreads();  // the next prefetch overwrites this buffer
  }

  // out = O / l (the quad's partial sums added in a fixed tree); lse = ln 2 * (m + log2 l).
  l0 = quad_sum(l0);
  l1 = quad_sum(l1);
  const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
  // A pair of adjacent columns per row: one 8-byte store (fp32) or one 4-byte store of the pair
  // rounded (bf16).
  auto store_pair = [&](int row, int col, float lo, float hi) {
    const int64_t i = ((tok0 + row) * H + h) * dv + col;
    if (a.out_bf16)
      *reinterpret_cast<uint32_t*>(static_cast<bf16_t*>(a.out) + i) = pack_bf16(lo, hi);
    else
      *reinterpret_cast<float2*>(static_cast<float*>(a.out) + i) = make_float2(lo, hi);
  };
#pragma unroll
  for (int n = 0; n < vTiles; ++n) {
    if (n * 8 >= nv) continue;
    const int col = c0 + n * 8 + 2 * t;
    if (row0 < seq) store_pair(row0, col, o[n][0] * inv0, o[n][1] * inv0);
    if (row1 < seq) store_pair(row1, col, o[n][2] * inv1, o[n][3] * inv1);
  }
  if (chunk == 0 && t == 0) {
    float* lse = a.lse + (int64_t(b) * H + h) * seq;
    if (row0 < seq) lse[row0] = (m0 + log2f(l0)) * kLn2;
    if (row1 < seq) lse[row1] = (m1 + log2f(l1)) * kLn2;
  }
}

template <int QK, int VC, int V>
cudaError_t launch_flash(const FlashArgs& args, int64_t batch) {
  constexpr FwdCfg C = kFwdVariants[V];
  constexpr size_t smem = flash_smem_bytes<QK, VC, V>();
  static_assert(smem <= 227 * 1024, "over the opt-in shared memory of sm_90");
  static const cudaError_t attr =
      cudaFuncSetAttribute(reinterpret_cast<const void*>(&flash_attention_kernel<QK, VC, V>),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (attr != cudaSuccess) return attr;
  constexpr int BM = 16 * C.warps;
  const dim3 grid(unsigned((args.seq + BM - 1) / BM), unsigned(args.heads),
                  unsigned(batch * args.chunks));
  flash_attention_kernel<QK, VC, V><<<grid, C.warps * 32, smem, stream()>>>(args);
  return cudaGetLastError();
}

// The instance that holds dqk and dv, variant V of kFwdVariants.
template <int V>
cudaError_t launch_variant(const FlashArgs& args, int64_t batch, bool small) {
  if (small) return launch_flash<64, 64, V>(args, batch);
  // (dqk <= 64 with dv > 64 takes the 128-wide K tile too: a <64, 128> instance spilled.)
  if (args.dqk <= 128) return launch_flash<128, 128, V>(args, batch);
  if (args.dqk <= 192) return launch_flash<192, 128, V>(args, batch);
  return launch_flash<256, 128, V>(args, batch);
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

bool flash_attention_supported(const AttentionShape& s, const void* out, bool out_bf16,
                               const void* q, const void* k, const void* v) {
  auto dim_ok = [](int64_t d) { return d >= 16 && d <= 256 && d % 16 == 0; };
  const int64_t chunks = s.dv <= 64 && s.dqk <= 64 ? 1 : (s.dv + 127) / 128;
  return dim_ok(s.dqk) && dim_ok(s.dv) && s.seq >= 1 && s.seq <= (int64_t(1) << 30) &&
         s.heads >= 1 && s.heads <= 65535 && s.batch >= 1 && s.batch * chunks <= 65535 &&
         reinterpret_cast<uintptr_t>(out) % (out_bf16 ? 4 : 8) == 0 && aligned16(q) &&
         aligned16(k) && aligned16(v);
}

cudaError_t flash_attention_forward(void* out, bool out_bf16, float* lse, const void* q,
                                    const void* k, const void* v, const AttentionShape& s) {
  if (s.batch * s.seq * s.heads == 0) return cudaSuccess;
  if (!flash_attention_supported(s, out, out_bf16, q, k, v)) return cudaErrorInvalidValue;
  const bool small = s.dqk <= 64 && s.dv <= 64;
  const int vc = small ? 64 : 128;
  const FlashArgs args{out,
                       out_bf16,
                       lse,
                       static_cast<const uint16_t*>(q),
                       static_cast<const uint16_t*>(k),
                       static_cast<const uint16_t*>(v),
                       int(s.seq),
                       int(s.heads),
                       int(s.dqk),
                       int(s.dv),
                       int((s.dv + vc - 1) / vc),
                       s.scale * kLog2e};
  // Default: variant 1 (8 warps, 128 query rows per block), the fastest on the H200 at both
  // measured shapes (192/128, 16 heads: 0.261 vs 0.268 ms at batch 1 x 2048, 0.755 vs 0.806 at
  // 4 x 2048; variants 2-4: 0.283-0.293 and 0.767-0.856).
  // Variants 5-10: the wgmma kernels (cuda_flash_attention_hopper.cu), tilings 0-5. The default
  // where the build and the device have them (else variant 1 runs) is 9, warp-specialised with
  // 128-key tiles: on the H200 at 192/128, 16 heads, batch 4 x 2048, 0.273 ms against 0.299
  // (variant 8, 64-key tiles) and 0.333 (variant 5, pipelined).
  const bool hopper = flash_attention_hopper_available();
  const int variant =
      flash_variant("MOEKIT_FLASH_FWD_VARIANT", kFwdVariantCount + kHopperTilings, hopper ? 9 : 1);
  if (variant >= kFwdVariantCount && hopper)
    return flash_attention_forward_hopper(args, s.batch, variant - kFwdVariantCount);
  switch (variant) {
    case 1:
      return launch_variant<1>(args, s.batch, small);
    case 2:
      return launch_variant<2>(args, s.batch, small);
    case 3:
      return launch_variant<3>(args, s.batch, small);
    case 4:
      return launch_variant<4>(args, s.batch, small);
    case 0:
      return launch_variant<0>(args, s.batch, small);
    default:  // a Hopper variant without the Hopper kernel
      return launch_variant<1>(args, s.batch, small);
  }
}

}  // namespace moekit::cuda
