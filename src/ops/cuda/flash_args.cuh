// The arguments of the flash-attention kernels, shared by the mma.sync kernels (forward:
// cuda_flash_attention.cu, backward: cuda_flash_attention_bwd.cu, which build them once) and the
// Hopper wgmma kernels (cuda_flash_attention_hopper.cu, _hopper_bwd.cu, which those functions hand
// them to), so each pair reads one struct and the shape checks stay in one place.
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
// compute capability 9.0. `tiling` in [0, kHopperTilings) picks the schedule and block shape
// (0: pipelined, 64-key tiles; 1: plain, 128 keys; 2: plain, 3 warpgroups, at dqk 129..192 only;
// 3: warp-specialised with TMA copies, 64 keys; 4: the same with 128 keys at dqk <= 192; 5: 4
// with the query tiles last in the grid). For args
// that flash_attention_supported took, v chunks of 128 columns (64 for the small instance, dqk and
// dv <= 64).
constexpr int kHopperTilings = 6;
bool flash_attention_hopper_available();
cudaError_t flash_attention_forward_hopper(const FlashArgs& args, int64_t batch, int tiling);

// The backward's: dq, dk, dv fp32 [tokens, heads, dim]; q, k, v and dO bf16; lse and delta =
// rowsum(dO * O) fp32 [batch, heads, seq].
struct FlashBwdArgs {
  float *dq, *dk, *dv;
  const uint16_t *q, *k, *v, *dout;  // bf16 bits
  const float *lse, *delta;          // [batch, heads, seq]
  int seq, heads, dqk, dvd;          // dvd: v's head dim
  float scale, scale_log2;           // scale, scale * log2(e)
};

// The wgmma backward (cuda_flash_attention_hopper_bwd.cu): where flash_attention_hopper_available()
// and the head dims fit one of its instances (dqk <= 64 and dv <= 64, both <= 128, or dqk <= 192
// and dv <= 128); cudaErrorInvalidValue elsewhere (the caller runs the mma.sync kernels).
// `tiling` in [0, kHopperBwdTilings) picks the query tile and buffer count (see that file).
constexpr int kHopperBwdTilings = 3;
bool flash_attention_backward_hopper_supported(int dqk, int dv);
cudaError_t flash_attention_backward_hopper(const FlashBwdArgs& args, int64_t batch, int tiling);

}  // namespace moekit::cuda
