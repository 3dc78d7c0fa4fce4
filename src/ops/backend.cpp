// The one dispatch point from a device to its backend. The CUDA backend registers here when it
// is compiled in (MOEKIT_HAVE_CUDA); otherwise asking for it is a clear error.
#include "core/error.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/ops.h"

namespace moekit {

#ifdef MOEKIT_HAVE_CUDA
Backend* cuda_backend();  // ops/cuda; null when no GPU is present
#endif

Backend& backend(Device device) {
  if (device == Device::CPU) {
    static CpuBackend cpu;
    return cpu;
  }
#ifdef MOEKIT_HAVE_CUDA
  if (Backend* b = cuda_backend()) return *b;
  fail("no CUDA device found (moekit was built with CUDA, but no GPU is visible)");
#else
  fail("this moekit was built without CUDA (rebuild with a CUDA toolkit and -DMOEKIT_CUDA=ON)");
#endif
}

bool backend_available(Device device) {
  if (device == Device::CPU) return true;
#ifdef MOEKIT_HAVE_CUDA
  return cuda_backend() != nullptr;
#else
  return false;
#endif
}

}  // namespace moekit
