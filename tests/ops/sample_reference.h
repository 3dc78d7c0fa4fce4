// Backend::sample's rule by brute force, for the tests of the CPU op
// (tests/ops/test_sample_ops.cpp) and of the GPU op (tests/ops/test_cuda_decode.cpp): the row
// fully sorted, masses in double, and the set of ids an implementation may return when its masses
// carry a relative rounding error up to `tol` (the exact choice, plus the neighbours of a boundary
// that u01 * kept mass or top_p * z lies within tol of).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <set>
#include <vector>

#include "ops/ops.h"

namespace moekit {

class SampleReference {
 public:
  SampleReference(const float* logits, int64_t n) : x_(logits, logits + n), order_(size_t(n)) {
    std::iota(order_.begin(), order_.end(), 0);
    std::sort(order_.begin(), order_.end(), [this](int32_t a, int32_t b) {
      return x_[size_t(a)] > x_[size_t(b)] || (x_[size_t(a)] == x_[size_t(b)] && a < b);
    });
  }

  // The most likely first (ties to the lower id).
  const std::vector<int32_t>& order() const { return order_; }

  std::set<int32_t> allowed(const SampleParams& p, double u01, double tol) const {
    const int64_t n = int64_t(x_.size());
    const float m = x_[size_t(order_[0])], inv_t = 1.0f / p.temperature;
    std::vector<double> w(static_cast<size_t>(n));  // by id, the rule's fp32 weights
    for (int64_t i = 0; i < n; ++i) w[size_t(i)] = double(std::exp((x_[size_t(i)] - m) * inv_t));
    const int64_t k = p.top_k > 0 && p.top_k < n ? p.top_k : n;
    const bool cut = k < n || p.top_p < 1.0f;
    std::vector<double> cum(size_t(k) + 1, 0.0);  // cum[i]: mass of the i most likely
    for (int64_t i = 0; i < k; ++i) cum[size_t(i) + 1] = cum[size_t(i)] + w[size_t(order_[i])];
    const double z = cum[size_t(k)];
    std::set<int64_t> keeps;  // the nucleus sizes rounding could give
    if (p.top_p >= 1.0f) {
      keeps.insert(k);
    } else {
      const double goal = double(p.top_p) * z;
      for (int64_t i = 1; i <= k; ++i)
        if (cum[size_t(i) - 1] < goal + tol * z && cum[size_t(i)] >= goal - tol * z)
          keeps.insert(i);
      if (keeps.empty()) keeps.insert(k);
    }
    std::set<int32_t> ids;
    for (int64_t keep : keeps) {
      // The walk: most likely first after a cut, else in id order.
      std::vector<int32_t> walk;
      if (cut) {
        walk.assign(order_.begin(), order_.begin() + keep);
      } else {
        walk.resize(size_t(n));
        std::iota(walk.begin(), walk.end(), 0);
      }
      double total = 0.0;
      for (int32_t i : walk) total += w[size_t(i)];
      const double u = u01 * total, slack = tol * total;
      double before = 0.0;
      const size_t found = ids.size();
      for (int32_t i : walk) {
        const double after = before + w[size_t(i)];
        // Token i owns [before, after); within the slack of either end it may be either side.
        if (w[size_t(i)] > 0.0 && u >= before - slack && u < after + slack) ids.insert(i);
        before = after;
      }
      if (ids.size() == found) ids.insert(walk.back());  // u at the very end: the last
    }
    return ids;
  }

 private:
  std::vector<float> x_;
  std::vector<int32_t> order_;
};

}  // namespace moekit
