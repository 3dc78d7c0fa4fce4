// Tensor helpers the tests share: normal draws in element order (from a generator, or from a seed),
// bit equality and the relative difference (of host or device tensors), so that a test file does
// not carry its own copy.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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

// max |a - b| / max |b| of two F32 tensors on any devices (0 when both are all zero).
inline double rel_diff(const Tensor& a_any, const Tensor& b_any) {
  const Tensor a = a_any.to_host(), b = b_any.to_host();
  EXPECT_EQ(a.numel(), b.numel());
  double d = 0.0, m = 0.0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    d = std::max(d, double(std::abs(a.f32()[i] - b.f32()[i])));
    m = std::max(m, double(std::abs(b.f32()[i])));
  }
  return m > 0.0 ? d / m : d;
}

}  // namespace moekit::test
