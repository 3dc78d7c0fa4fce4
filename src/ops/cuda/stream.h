// The CUDA stream that all of the backend's work is queued on, in call order. Not the legacy
// default stream: CUDA graphs (decode steps) can only capture work on a created stream. It is a
// blocking stream, so plain cudaMemcpy calls still wait for the kernels queued before them.
#pragma once

#include <cuda_runtime_api.h>

namespace moekit::cuda {

cudaStream_t stream();

}  // namespace moekit::cuda
