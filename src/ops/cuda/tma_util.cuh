// Hopper's asynchronous copy machinery (sm_90): the Tensor Memory Accelerator (TMA) loads of 2-D
// tiles described by a tensor map, the shared-memory mbarriers that count their bytes, and the
// register reallocation between warpgroups of one block. One thread issues a whole tile's copy
// (cp.async needs every thread of a warpgroup and its registers for addresses), and the copy lands
// in wgmma's 128-byte-swizzled layout (wgmma_util.cuh) by itself. Used by the routed experts' GEMM
// (cuda_expert_gemm.cu) and the warp-specialised attention forward
// (cuda_flash_attention_hopper.cu), whose producer warp feeds two consumer warpgroups through a
// ring of stages.
//
// Compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the callers guard on it.
#pragma once

#include <cstdint>

namespace moekit::cuda {

// An mbarrier in shared memory (8 bytes at `bar`) expecting `count` arrivals per phase.
__device__ inline void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialised barriers visible to the async proxy (the TMA unit completes transactions on
// them); one thread after its inits, before the block-wide barrier that publishes them.
__device__ inline void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` of TMA transactions: the phase completes when every
// arrival and every announced byte is in.
__device__ inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ inline void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed. A fresh barrier is in phase 0, and the
// phase before it counts as complete: waiting on parity 1 returns at once (a producer's first
// pass over an empty ring).
__device__ inline void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// TMA: the box at (c0, c1) (c0 the contiguous dimension, in elements) of the tensor `map`
// describes, into shared memory at `dst`, completing its bytes on the mbarrier `bar`. Boxes
// reaching past the tensor are filled with zeros (and still count their whole size). `map` is the
// generic address of a 128-byte tensor map in kernel-parameter, constant or global memory.
__device__ inline void tma_load_2d(uint32_t dst, const void* map, uint32_t bar, int32_t c0,
                                   int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// The same for a 4-D tensor map: the box at (c0, c1, c2, c3), c0 the contiguous dimension.
__device__ inline void tma_load_4d(uint32_t dst, const void* map, uint32_t bar, int32_t c0,
                                   int32_t c1, int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Named barriers (ids 1-15; __syncthreads is 0) between some warps of a block: `threads` counts
// every thread that syncs or arrives in one phase. sync waits for the phase; arrive counts
// itself and goes on (a signal to warps that sync).
__device__ inline void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ inline void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Register reallocation between the warpgroups of a block (all threads of a warpgroup run it): a
// producer that only issues copies gives registers back, consumers holding wide accumulators take
// them. N is a multiple of 8 in [24, 256].
template <int N>
__device__ inline void regs_release() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ inline void regs_claim() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace moekit::cuda
