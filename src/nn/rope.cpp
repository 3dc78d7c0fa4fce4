// Rotary tables. Frequencies are computed in float like the reference (parity), angles too.
#include "nn/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace moekit {

namespace {
// The rope dim whose wavelength turns `rotations` times over the original context.
double correction_dim(double rotations, double dim, double base, double max_pos) {
  return dim * std::log(max_pos / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}
}  // namespace

std::vector<float> rope_inv_freq(const ModelConfig& c) {
  const int64_t dim = c.qk_rope_head_dim, half = dim / 2;
  const float base = float(c.rope_theta);
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t j = 0; j < half; ++j)
    inv[size_t(j)] = 1.0f / std::pow(base, float(2 * j) / float(dim));
  if (c.rope_scaling.type != "yarn") return inv;
  const auto& y = c.rope_scaling;
  double low = std::floor(correction_dim(y.beta_fast, double(dim), c.rope_theta,
                                         double(y.original_max_position_embeddings)));
  double high = std::ceil(correction_dim(y.beta_slow, double(dim), c.rope_theta,
                                         double(y.original_max_position_embeddings)));
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;
  for (int64_t j = 0; j < half; ++j) {
    // Ramp 0 -> 1 across [low, high]: 0 keeps the original frequency (extrapolation).
    float ramp = std::clamp(float((double(j) - low) / (high - low)), 0.0f, 1.0f);
    float extrap = 1.0f - ramp;
    float f = inv[size_t(j)];
    inv[size_t(j)] = (f / float(y.factor)) * (1.0f - extrap) + f * extrap;
  }
  return inv;
}

RopeTable RopeTable::build(const ModelConfig& c, int64_t n_positions, Device device) {
  const int64_t half = c.qk_rope_head_dim / 2;
  std::vector<float> inv = rope_inv_freq(c);
  const float factor = float(c.rope_attention_factor());
  Tensor cs = Tensor::empty({n_positions, half}), sn = Tensor::empty({n_positions, half});
  for (int64_t p = 0; p < n_positions; ++p)
    for (int64_t j = 0; j < half; ++j) {
      float angle = float(p) * inv[size_t(j)];
      cs.f32()[p * half + j] = std::cos(angle) * factor;
      sn.f32()[p * half + j] = std::sin(angle) * factor;
    }
  RopeTable t;
  t.cos = cs.to_device(device);
  t.sin = sn.to_device(device);
  return t;
}

}  // namespace moekit
