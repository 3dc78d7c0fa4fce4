// Finite-difference gradient checking for the layer tests.
// L = sum(y * R) (+ an optional extra scalar term the layer adds itself, e.g. an auxiliary
// loss) for a fixed random R, so dL/dy = R. For each checked tensor X (an input or a
// parameter) we compare the analytic directional derivative <dL/dX, V> with the central
// difference (L(X + eps V) - L(X - eps V)) / (2 eps) along random directions V, and the
// analytic gradient at a few single coordinates. fp32 throughout: eps and tolerances are chosen
// so rounding noise stays ~100x below the tolerance while a wrong sign, a missing term or a
// factor error (>= 1%) does not pass.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moekit::test {

inline Tensor randn(Shape s, std::mt19937_64& rng, float std = 1.0f) {
  Tensor t = Tensor::empty(s);
  std::normal_distribution<float> n(0.0f, std);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t;
}

struct Checked {
  std::string name;
  Tensor value;  // perturbed in place
  Tensor grad;   // analytic gradient, filled by `backward`
};

struct GradCheckResult {
  double worst_rel = 0.0;
  std::string worst;
};

// forward(): computes y from the current values; backward(dy): fills every Checked::grad
// (zeroing first is the caller's job).
inline GradCheckResult grad_check(const std::function<Tensor()>& forward,
                                  const std::function<void(const Tensor&)>& backward,
                                  std::vector<Checked>& checked, uint64_t seed = 7,
                                  float eps = 2e-3f, int directions = 3, int coords = 3,
                                  const std::function<double()>& extra_loss = nullptr) {
  std::mt19937_64 rng(seed);
  Tensor y0 = forward();
  Tensor r = randn(y0.shape(), rng);
  auto loss = [&] {
    Tensor y = forward();
    double s = 0.0;
    for (int64_t i = 0; i < y.numel(); ++i) s += double(y.f32()[i]) * double(r.f32()[i]);
    return extra_loss ? s + extra_loss() : s;
  };
  forward();
  backward(r);
  GradCheckResult res;
  auto compare = [&](const std::string& what, double analytic, double numeric, double scale) {
    double rel = std::abs(analytic - numeric) / std::max(scale, 1e-3);
    if (rel > res.worst_rel) {
      res.worst_rel = rel;
      res.worst =
          what + ": analytic " + std::to_string(analytic) + " numeric " + std::to_string(numeric);
    }
  };
  for (auto& c : checked) {
    float* v = c.value.f32();
    const int64_t n = c.value.numel();
    for (int d = 0; d < directions; ++d) {
      Tensor dir = randn(c.value.shape(), rng);
      double analytic = 0.0, gnorm = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        analytic += double(c.grad.f32()[i]) * dir.f32()[i];
        gnorm += double(c.grad.f32()[i]) * c.grad.f32()[i];
      }
      Tensor saved = c.value.clone();
      for (int64_t i = 0; i < n; ++i) v[i] = saved.f32()[i] + eps * dir.f32()[i];
      double lp = loss();
      for (int64_t i = 0; i < n; ++i) v[i] = saved.f32()[i] - eps * dir.f32()[i];
      double lm = loss();
      c.value.copy_from(saved);
      double numeric = (lp - lm) / (2.0 * eps);
      // Scale: |grad| * sqrt(n) is the typical size of <grad, dir> for a random dir.
      compare(c.name + " dir " + std::to_string(d), analytic, numeric,
              std::sqrt(gnorm) * 1.0 + std::abs(numeric));
    }
    std::uniform_int_distribution<int64_t> pick(0, n - 1);
    for (int k = 0; k < coords; ++k) {
      int64_t i = pick(rng);
      float orig = v[i];
      v[i] = orig + eps;
      double lp = loss();
      v[i] = orig - eps;
      double lm = loss();
      v[i] = orig;
      double numeric = (lp - lm) / (2.0 * eps);
      double gmax = 0.0;
      for (int64_t j = 0; j < n; ++j) gmax = std::max(gmax, double(std::abs(c.grad.f32()[j])));
      compare(c.name + "[" + std::to_string(i) + "]", c.grad.f32()[i], numeric,
              gmax + std::abs(numeric));
    }
  }
  forward();  // leave saved activations consistent with the unperturbed values
  return res;
}

}  // namespace moekit::test
