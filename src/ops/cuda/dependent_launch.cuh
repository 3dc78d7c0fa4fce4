// Programmatic dependent launch (Hopper, sm_90+) for the small kernels of a decode step. A decode
// step is a chain of about a dozen short kernels per layer, each waiting for the one before:
// without help, every boundary costs the next kernel's launch plus its first memory latency
// (~2 us per kernel on an H200, measured with Nsight Compute). A kernel launched by
// launch_dependent may be scheduled while its predecessor still runs, and waits in
// wait_for_inputs() until the predecessor has finished and its writes are visible. Before that
// wait it may only read BF16 weights (cuda_gemv.cu's preloading GEMV; prefetching weight rows
// into L2 instead was tried: slower). That is safe by one rule: a kernel that calls
// allow_dependents() (first thing, so its successor is scheduled as soon as all its blocks are
// resident) writes no BF16 tensor; every other kernel has finished before its successor starts.
// MOEKIT_CUDA_PDL=0 launches them plainly (the device-side calls are then no-ops);
// dependent_launch_enabled() is in stream.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/stream.h"

namespace moekit::cuda {

__device__ inline void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ inline void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream()>>>(args...), allowed to start before the previous kernel
// on the stream ends. Only for kernels that call wait_for_inputs() before touching any data but
// BF16 weights (see above).
template <typename... Params, typename... Args>
cudaError_t launch_dependent_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                  Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream();
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  if (dependent_launch_enabled()) {
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  return launch_dependent_smem(kernel, grid, block, 0, args...);
}

}  // namespace moekit::cuda
