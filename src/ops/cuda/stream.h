// The CUDA stream that all of the backend's work is queued on, in call order. Not the legacy
// default stream: CUDA graphs (decode steps) can only capture work on a created stream. It is a
// blocking stream, so plain cudaMemcpy calls still wait for the kernels queued before them.
// Also whether its kernels may overlap their predecessors (programmatic dependent launch).
#pragma once

#include <cuda_runtime_api.h>

namespace moekit::cuda {

cudaStream_t stream();

// Whether kernels may be launched for programmatic dependent launch (dependent_launch.cuh): a GPU
// of compute capability 9.0 or newer, and MOEKIT_CUDA_PDL not "0".
bool dependent_launch_enabled();

}  // namespace moekit::cuda
