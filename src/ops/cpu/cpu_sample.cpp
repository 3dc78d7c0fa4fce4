// CPU backend: Backend::sample, i.e. sampling's rule (sample_row, the reference of every backend)
// and the argument checks that every backend runs alike (check_sample). The random draw is the
// caller's (u01), so the GPU's op and this one make the same choice from the same draw.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_util.h"

namespace moekit {

// One exp per candidate, and only the tokens that must be ordered are: top-k and the nucleus take
// heap selections of the most likely few (std::partial_sort, O(n log k)); without either nothing
// is sorted and the pick walks in id order (a 102,400 vocabulary fully sorted per token took
// 22-32 ms, ten GPU decode steps).
int32_t sample_row(const float* logits, int64_t n, const SampleParams& p, double u01) {
  // Most likely first; ties to the lower id (a strict total order, so the choice is reproducible).
  auto before = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::vector<int32_t> cand(static_cast<size_t>(n));
  std::iota(cand.begin(), cand.end(), 0);
  if (p.top_k > 0 && p.top_k < n) {
    std::partial_sort(cand.begin(), cand.begin() + p.top_k, cand.end(), before);
    cand.resize(size_t(p.top_k));
  }
  const float m = logits[*std::min_element(cand.begin(), cand.end(), before)];
  std::vector<float> w(static_cast<size_t>(n));  // by token id, for the candidates (sums: double)
  double z = 0.0;
  const float inv_t = 1.0f / p.temperature;
  for (int32_t i : cand) z += (w[size_t(i)] = std::exp((logits[i] - m) * inv_t));
  // Nucleus: the smallest prefix (in probability order) whose mass reaches top_p, looked for among
  // the k most likely candidates (k x4 until it is found there).
  size_t keep = cand.size();
  if (p.top_p < 1.0f) {
    for (size_t k = std::min<size_t>(64, cand.size());; k = std::min(cand.size(), k * 4)) {
      std::partial_sort(cand.begin(), cand.begin() + long(k), cand.end(), before);
      double mass = 0.0;
      size_t i = 0;
      while (i < k && (mass += w[size_t(cand[i])] / z) < p.top_p) ++i;
      if (i < k || k == cand.size()) {
        keep = std::min(i + 1, k);
        break;
      }
    }
  }
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) total += w[size_t(cand[i])];
  // u01 * total is what std::uniform_real_distribution<double>(0, total) returned for the same
  // engine output before the draw moved to the caller, so seeded generations did not change.
  double u = u01 * total;
  for (size_t i = 0; i < keep; ++i)
    if ((u -= w[size_t(cand[i])]) < 0.0) return cand[i];
  return cand[keep - 1];  // u == total after rounding
}

void check_sample(const Tensor& id, const Tensor& logits, int64_t n, const SampleParams& p,
                  double u01) {
  MOEKIT_CHECK(id.defined() && id.dtype() == DType::I32 && id.numel() == 1,
               "sample: id must be one I32, got {} {}", id.defined() ? dtype_name(id.dtype()) : "",
               id.defined() ? id.shape().str() : "undefined");
  MOEKIT_CHECK(
      logits.defined() && logits.dtype() == DType::F32 && logits.ndim() == 2 && logits.dim(0) == 1,
      "sample: logits must be F32 [1, V], got {}",
      logits.defined() ? logits.shape().str() : "undefined");
  MOEKIT_CHECK(n > 0 && n <= logits.dim(1), "sample: n {} of {} logits", n, logits.dim(1));
  MOEKIT_CHECK(p.temperature > 0.0f && std::isfinite(p.temperature),
               "sample: temperature {} (must be > 0; greedy decoding is argmax)", p.temperature);
  MOEKIT_CHECK(p.top_k >= 0, "sample: top_k {} < 0", p.top_k);
  MOEKIT_CHECK(!std::isnan(p.top_p), "sample: top_p is NaN");
  MOEKIT_CHECK(u01 >= 0.0 && u01 <= 1.0, "sample: u01 {} outside [0, 1]", u01);
}

void CpuBackend::sample(Tensor& id, const Tensor& logits, int64_t n, const SampleParams& p,
                        double u01) {
  check_sample(id, logits, n, p, u01);
  id.i32()[0] = sample_row(logits.f32(), n, p, u01);
}

}  // namespace moekit
