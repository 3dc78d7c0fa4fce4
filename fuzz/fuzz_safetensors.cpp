// libFuzzer target: arbitrary bytes as a .safetensors file. moekit::Error is the expected answer
// to bad input; anything else (a crash, a sanitizer report, another exception) is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "core/error.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fd = memfd_create("fuzz.safetensors", 0);
  if (fd < 0) return 0;
  if (size && ::write(fd, data, size) != ssize_t(size)) {
    ::close(fd);
    return 0;
  }
  try {
    auto f = moekit::SafetensorsFile::open("/proc/self/fd/" + std::to_string(fd));
    for (const auto& [name, e] : f.tensors()) {
      volatile float sink = 0;  // touch every tensor's bytes: offsets must be inside the file
      moekit::Tensor v = e.tensor.to_f32();
      for (int64_t i = 0; i < v.numel(); ++i) sink = sink + v.f32()[i];
    }
  } catch (const moekit::Error&) {
  }
  ::close(fd);
  return 0;
}
