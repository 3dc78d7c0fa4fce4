// CUDA kernels, part 9: the routed experts' GEMM of our own on Hopper (sm_90a). One persistent
// launch covers every expert's row blocks; the Tensor Memory Accelerator (TMA) brings the operand
// tiles in, warpgroup MMAs (wgmma) multiply them, and for the gate and up projections SwiGLU runs
// in the epilogue, so h is the only product that must reach memory.
//
// Why our own kernel: cuBLAS has no grouped GEMM on Hopper's warpgroup kernels (its grouped API
// runs sm80 warp-level kernels, ~310 TFLOP/s on V2-Lite's experts). Its batched GEMM has them, but
// takes one call per padded block size: about six per projection on V2-Lite, each with its own
// tail wave and a ~4 us gap before it. Those calls ran the full model's routed experts at
// ~640 TFLOP/s, and the gate and up products then went through memory twice more for SwiGLU.
//
// Status (measured on the H200, bench/RESULTS.md): correct, but at ~560 TFLOP/s on V2-Lite's
// expert shapes it is slower than cuBLAS's batched GEMMs (~700 on the same padded blocks), so
// the backend runs it only when asked (MOEKIT_CUDA_EXPERT_GEMM=own). The operand tiles arrive at
// ~6.6 TB/s summed over the SMs, in both kernels: one 128 x 256 tile per k-block of 64 reads
// 48 KiB for 4.2 MFLOP, and the ring holds 4 stages (all the shared memory), so the loads are
// bound by L2's bandwidth or its latency under load (Little's law). Pairs of blocks sharing the
// weight tile by TMA multicast (a 2-block cluster, 32 KiB per block and k-block) ran slower
// still (~1.5x the time: both blocks then wait for each other at every stage). The epilogue,
// 4-byte stores from registers, does not overlap the next tile's k-loop either.
//
// Layout: three warpgroups per block, one block per SM walking tiles (persistent).
//  - Warpgroup 0 produces. One thread issues, per k-block of 64 columns, the TMA loads of the
//    tile's 128 activation rows and 256 weight rows (two 128-row boxes: the gate and up rows of
//    128 intermediate columns, or 256 rows of one projection) into a ring of 4 stages. Each stage
//    has a "full" mbarrier (counting the TMA bytes) and an "empty" one (the consumers are done).
//  - Warpgroups 1 and 2 consume. Each multiplies its 64 rows of the stage's A tile by the whole
//    B tile (m64n256k16: fp32 accumulators in 128 registers per thread), releases the stage once
//    its wgmmas have read it, and after the last k-block writes its results from registers.
//  - setmaxnreg moves registers from the producer (40) to the consumers (232).
// Tiles go in (row block, column block) order, so the blocks at work at one time read one or two
// experts' weights, which stay in L2. Every row block holds one expert's rows (the dispatch plan
// pads each expert to a multiple of 128 with zero rows), so a tile needs no masking of rows; the
// columns past n and the k past the end come in as zeros from TMA and are not stored.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_args.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/mma_util.cuh"
#include "ops/cuda/tma_util.cuh"
#include "ops/cuda/wgmma_util.cuh"

namespace moekit::cuda {

static_assert(sizeof(TensorMap) == sizeof(CUtensorMap) && alignof(TensorMap) >= 64);

// Device code and its constants (a named namespace: nvcc's host pass, which sees no kernel body
// outside sm_90a, would warn about unreferenced helpers in an anonymous one).
namespace expert_gemm_detail {

constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 4;
constexpr int kBoxRows = 128;                    // rows of one TMA box (A tile, half a B tile)
constexpr uint32_t kATileBytes = kBM * kBK * 2;  // 16 KiB
constexpr uint32_t kBTileBytes = kBN * kBK * 2;  // 32 KiB
constexpr uint32_t kStageBytes = kATileBytes + kBTileBytes;
constexpr int kBlockThreads = 384;  // a producer and two consumer warpgroups
constexpr int kConsumerWarps = (kBlockThreads - 128) / 32;  // the empty barriers' count
static_assert(kConsumerWarps == 8, "two consumer warpgroups of 64 rows make the 128-row tile");
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 1024 + 2 * kStages * 8;
static_assert(kSmemBytes <= 227 * 1024, "over the opt-in shared memory of sm_90");

struct ExpertGemmParams {
  CUtensorMap a_map;
  const CUtensorMap* w_maps;
  const int32_t* block_expert;
  int m_tiles, n_tiles, k_blocks;
  int n;
  __nv_bfloat16* out;
  __nv_bfloat16* gate;
  __nv_bfloat16* up;
  int64_t ld_out;
};

__device__ inline void store_pair(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// The epilogue of one consumer warpgroup: its 64 x 256 accumulators (wgmma_util.cuh's layout:
// rows 16w + g and + 8, columns 8j + 2t and + 1) to memory. row: the first of the warp's rows.
template <bool SwiGLU>
__device__ inline void store_tile(const ExpertGemmParams& p, const float (&acc)[128], int64_t row,
                                  int col0, int t) {
  __nv_bfloat16* const out0 = p.out + row * p.ld_out;
  __nv_bfloat16* const out1 = out0 + 8 * p.ld_out;
  if constexpr (!SwiGLU) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = col0 + 8 * j + 2 * t;
      if (col >= p.n) break;  // n is even, so col + 1 < n too
      store_pair(out0 + col, acc[4 * j], acc[4 * j + 1]);
      store_pair(out1 + col, acc[4 * j + 2], acc[4 * j + 3]);
    }
  } else {
    // Columns 0-127 are the gate products, 128-255 the up products of the same 128 intermediate
    // columns: the same thread holds both. Each is rounded to bf16 first, as stored.
    const int64_t off0 = row * p.ld_out, off1 = off0 + 8 * p.ld_out;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = col0 + 8 * j + 2 * t;
      if (col >= p.n) break;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = 4 * j + 2 * half;
        const __nv_bfloat162 g = __floats2bfloat162_rn(acc[i], acc[i + 1]);
        const __nv_bfloat162 u = __floats2bfloat162_rn(acc[64 + i], acc[64 + i + 1]);
        const int64_t off = (half ? off1 : off0) + col;
        store_pair(p.out + off, silu_mul(__low2float(g), __low2float(u)),
                   silu_mul(__high2float(g), __high2float(u)));
        if (p.gate) *reinterpret_cast<__nv_bfloat162*>(p.gate + off) = g;
        if (p.up) *reinterpret_cast<__nv_bfloat162*>(p.up + off) = u;
      }
    }
  }
}

template <bool SwiGLU>
__global__ void __launch_bounds__(kBlockThreads, 1)
    expert_gemm_kernel(const __grid_constant__ ExpertGemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes of address: tiles start on such a boundary.
  const uint32_t base = (shared_address(smem_raw) + 1023u) & ~1023u;
  const uint32_t bars = base + kStages * kStageBytes;
  auto full = [&](int s) { return bars + 8u * uint32_t(s); };
  auto empty = [&](int s) { return bars + 8u * uint32_t(kStages + s); };
  const int wg = int(threadIdx.x) / 128, tid = int(threadIdx.x) % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int tiles = p.m_tiles * p.n_tiles;
  if (wg == 0) {  // producer
    regs_release<40>();
    if (tid != 0) return;
    int s = 0;
    uint32_t phase = 0;
    for (int tile = int(blockIdx.x); tile < tiles; tile += int(gridDim.x)) {
      const int mt = tile / p.n_tiles, nt = tile % p.n_tiles;
      const CUtensorMap* w0 = p.w_maps + 2 * p.block_expert[mt];
      const CUtensorMap* w1 = SwiGLU ? w0 + 1 : w0;
      const int r0 = SwiGLU ? nt * kBoxRows : nt * kBN;
      const int r1 = SwiGLU ? r0 : r0 + kBoxRows;
      // A projection's last column tile may end before its second box: that box is not loaded
      // (its accumulator columns are past n and never stored), so no copy is wholly outside the
      // tensor.
      const bool second = SwiGLU || r1 < p.n;
      const uint32_t bytes = second ? kStageBytes : kStageBytes - kBTileBytes / 2;
      for (int kb = 0; kb < p.k_blocks; ++kb) {
        mbar_wait(empty(s), phase ^ 1u);
        const uint32_t a = base + uint32_t(s) * kStageBytes, b = a + kATileBytes;
        mbar_arrive_expect_tx(full(s), bytes);
        tma_load_2d(a, &p.a_map, full(s), kb * kBK, mt * kBM);
        tma_load_2d(b, w0, full(s), kb * kBK, r0);
        if (second) tma_load_2d(b + kBTileBytes / 2, w1, full(s), kb * kBK, r1);
        if (++s == kStages) {
          s = 0;
          phase ^= 1u;
        }
      }
    }
    return;
  }
  regs_claim<232>();
  const int half = wg - 1;  // which 64 rows of the tile
  const int warp = tid / 32, lane = tid % 32;
  int s = 0;
  uint32_t phase = 0;
  for (int tile = int(blockIdx.x); tile < tiles; tile += int(gridDim.x)) {
    const int mt = tile / p.n_tiles, nt = tile % p.n_tiles;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    int prev = -1;
    for (int kb = 0; kb < p.k_blocks; ++kb) {
      mbar_wait(full(s), phase);
      const uint32_t a = base + uint32_t(s) * kStageBytes + uint32_t(half) * (kATileBytes / 2);
      const uint32_t b = base + uint32_t(s) * kStageBytes + kATileBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk)
        wgmma_ss_n256(acc, wgmma_desc(a + kk * 32, 16, 1024), wgmma_desc(b + kk * 32, 16, 1024), 1);
      wgmma_commit();
      // The previous k-block's wgmmas are done once at most this one is in flight: its stage is
      // free. Each warp says so; the stage's empty barrier completes with all eight.
      if (prev >= 0) {
        wgmma_wait<1>();
        __syncwarp();
        if (lane == 0) mbar_arrive(empty(prev));
      }
      prev = s;
      if (++s == kStages) {
        s = 0;
        phase ^= 1u;
      }
    }
    wgmma_wait_all();
    wgmma_fence_operands(acc);
    if (prev >= 0) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(prev));
    }
    const int64_t row = int64_t(mt) * kBM + half * 64 + warp * 16 + lane / 4;
    store_tile<SwiGLU>(p, acc, row, nt * (SwiGLU ? kBoxRows : kBN), lane % 4);
  }
#else
  __trap();  // built without sm_90a: expert_gemm_available() is false
#endif
}

}  // namespace expert_gemm_detail

namespace {

using namespace expert_gemm_detail;

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return PFN_cuTensorMapEncodeTiled_v12000(nullptr);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

int sm_count() {
  static const int n = current_device_attribute(cudaDevAttrMultiProcessorCount);
  return n;
}

template <bool SwiGLU>
cudaError_t launch(const ExpertGemmParams& p, int tiles) {
  static const cudaError_t attr = cudaFuncSetAttribute(
      expert_gemm_kernel<SwiGLU>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes));
  if (attr != cudaSuccess) return attr;
  const int grid = tiles < sm_count() ? tiles : sm_count();
  expert_gemm_kernel<SwiGLU><<<grid, kBlockThreads, kSmemBytes, stream()>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool expert_gemm_available() {
  // The same condition as the Hopper attention kernels' (sm_90a code on compute capability 9.0),
  // and a driver that encodes tensor maps.
  return flash_attention_hopper_available() && encode_tiled() != nullptr && sm_count() > 0;
}

cudaError_t encode_bf16_tensor_map(TensorMap* map, const void* base, int rank, const uint64_t* dims,
                                   const uint64_t* strides, const uint32_t* box) {
  if (encode_tiled() == nullptr) return cudaErrorNotSupported;
  if (rank < 1 || rank > 5 || reinterpret_cast<uintptr_t>(base) % 16 != 0)
    return cudaErrorInvalidValue;
  for (int i = 0; i + 1 < rank; ++i)
    if (strides[i] % 16 != 0 || strides[i] >= (uint64_t(1) << 40)) return cudaErrorInvalidValue;
  cuuint64_t d[5], st[4];
  cuuint32_t b[5], elem_strides[5];
  for (int i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32) || box[i] == 0 || box[i] > 256)
      return cudaErrorInvalidValue;
    d[i] = dims[i];
    b[i] = box[i];
    elem_strides[i] = 1;
    if (i + 1 < rank) st[i] = strides[i];
  }
  const CUresult r =
      encode_tiled()(reinterpret_cast<CUtensorMap*>(map), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                     cuuint32_t(rank), const_cast<void*>(base), d, st, b, elem_strides,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t expert_gemm_tensor_map(TensorMap* map, const void* base, int64_t rows, int64_t cols,
                                   int64_t ld) {
  constexpr int64_t kMax = int64_t(1) << 31;
  if (rows <= 0 || cols <= 0 || ld < cols || rows >= kMax || ld >= kMax)
    return cudaErrorInvalidValue;
  const uint64_t dims[2] = {uint64_t(cols), uint64_t(rows)};
  const uint64_t strides[1] = {uint64_t(ld) * 2};
  const uint32_t box[2] = {uint32_t(kBK), uint32_t(kBoxRows)};
  return encode_bf16_tensor_map(map, base, 2, dims, strides, box);
}

cudaError_t expert_gemm(const ExpertGemmArgs& a) {
  if (a.rows == 0 || a.n == 0) return cudaSuccess;
  if (!expert_gemm_available()) return cudaErrorNotSupported;
  if (a.rows % kBM != 0 || a.k <= 0 || a.k % 8 != 0 || a.n % 2 != 0 || a.ld_out < a.n ||
      a.rows / kBM >= (int64_t(1) << 31) || a.n >= (int64_t(1) << 31) || a.k >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;
  ExpertGemmParams p{};
  std::memcpy(&p.a_map, &a.a_map, sizeof(p.a_map));
  p.w_maps = reinterpret_cast<const CUtensorMap*>(a.w_maps);
  p.block_expert = a.block_expert;
  p.m_tiles = int(a.rows / kBM);
  const int cols_per_tile = a.swiglu ? kBoxRows : kBN;
  p.n_tiles = int((a.n + cols_per_tile - 1) / cols_per_tile);
  p.k_blocks = int((a.k + kBK - 1) / kBK);
  p.n = int(a.n);
  p.out = static_cast<__nv_bfloat16*>(a.out);
  p.gate = static_cast<__nv_bfloat16*>(a.gate);
  p.up = static_cast<__nv_bfloat16*>(a.up);
  p.ld_out = a.ld_out;
  const int64_t tiles = int64_t(p.m_tiles) * p.n_tiles;
  if (tiles >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  return a.swiglu ? launch<true>(p, int(tiles)) : launch<false>(p, int(tiles));
}

}  // namespace moekit::cuda
