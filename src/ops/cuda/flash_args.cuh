// The arguments of the flash-attention forward kernels, shared by the mma.sync kernel
// (cuda_flash_attention.cu, which builds them once in flash_attention_forward) and the Hopper wgmma
// kernel (cuda_flash_attention_hopper.cu, which that function hands them to), so both kernels
// read one struct and the shape checks stay in one place.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace moekit::cuda {

struct FlashArgs {
  void* out;  // fp32, or bf16 when out_bf16
  bool out_bf16;
  float* lse;
  const uint16_t *q, *k, *v;        // bf16 bits
  int seq, heads, dqk, dv, chunks;  // chunks: v-column chunks per sequence (blocks in grid z)
  float scale_log2;                 // scale * log2(e)
};

// The wgmma kernel (cuda_flash_attention_hopper.cu). Available when the build includes sm_90a
// code (MOEKIT_CUDA_WGMMA: "90a" in CMAKE_CUDA_ARCHITECTURES, the default) and the device is
// compute capability 9.0. `tiling` in [0, kHopperTilings) picks the block shape at dqk 129..192
// (0: pipelined, 64-key tiles; 1: plain, 128 keys; 2: plain, 3 warpgroups); other head sizes have
// one. For args that flash_attention_supported took, v chunks of 128 columns (64 for the small
// instance, dqk and dv <= 64).
constexpr int kHopperTilings = 3;
bool flash_attention_hopper_available();
cudaError_t flash_attention_forward_hopper(const FlashArgs& args, int64_t batch, int tiling);

}  // namespace moekit::cuda
