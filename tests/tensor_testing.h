// Tensor helpers the tests share: normal draws in element order (from a generator, or from a seed)
// and bit equality (of host or device tensors), so that a test file does not carry its own copy.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>

#include "core/tensor.h"

namespace moekit::test {

// N(0, std^2) fp32 values, drawn one per element in order from `rng`.
inline Tensor randn(Shape s, std::mt19937_64& rng, float std = 1.0f) {
  std::normal_distribution<float> n(0.0f, std);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t;
}
// The same from a fresh generator seeded with `seed`.
inline Tensor randn(Shape s, uint64_t seed, float std = 1.0f) {
  std::mt19937_64 rng(seed);
  return randn(s, rng, std);
}

// Same bytes (shape aside): what "bit-identical" asserts.
inline bool bit_equal(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to_host(), y = b.to_host();
  return x.nbytes() == y.nbytes() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
}

}  // namespace moekit::test
