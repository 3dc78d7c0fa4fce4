// Host-side helpers of the CUDA backend: CUDA status -> moekit::Error naming the op, and the
// argument checks every op runs before launching (device, dtype, defined).
#pragma once

#include <cuda_runtime_api.h>

#include <initializer_list>
#include <string>

#include "core/error.h"
#include "core/tensor.h"
#include "ops/cpu/cpu_util.h"

namespace moekit::cuda {

// Launch functions return the launch status (a bad configuration); a fault inside a kernel
// surfaces at the next synchronising call (a copy back to the host), which names its own op.
inline void check(cudaError_t e, const char* op) {
  if (e != cudaSuccess) fail("CUDA {}: {} ({})", op, cudaGetErrorString(e), cudaGetErrorName(e));
}

inline void expect(const Tensor& t, DType dtype, const char* op, const char* name) {
  if (!t.defined()) fail("CUDA {}: tensor {} is undefined", op, name);
  if (t.device() != Device::CUDA) fail("CUDA {}: tensor {} is in host memory", op, name);
  if (t.dtype() != dtype)
    fail("CUDA {}: tensor {} is {}, expected {}", op, name, dtype_name(t.dtype()),
         dtype_name(dtype));
}
inline void expect_f32(const Tensor& t, const char* op, const char* name) {
  expect(t, DType::F32, op, name);
}
// An activation stored as F32 or BF16 (the ops with bf16 variants).
inline void expect_f32_or_bf16(const Tensor& t, const char* op, const char* name) {
  if (t.defined() && t.dtype() != DType::F32 && t.dtype() != DType::BF16)
    fail("CUDA {}: tensor {} is {}, expected F32 or BF16", op, name, dtype_name(t.dtype()));
  expect(t, t.dtype(), op, name);
}
inline void expect_all_f32(std::initializer_list<const Tensor*> ts, const char* op) {
  int i = 0;
  for (const Tensor* t : ts) {
    const std::string name = "#" + std::to_string(i++);
    expect(*t, DType::F32, op, name.c_str());
  }
}
inline void expect_numel(const Tensor& t, int64_t n, const char* op, const char* name) {
  if (t.numel() != n)
    fail("CUDA {}: tensor {} has shape {}, expected {} elements", op, name, t.shape().str(), n);
}

// Index tensors are range-checked by CudaBackend::check_indices, or inside the op's kernel with
// CudaBackend::index_check (asynchronous either way; cuda_backend.h).

}  // namespace moekit::cuda
