// Rotary position tables for MLA's rope dims: cos/sin [positions, rope_dim/2], with YaRN's
// blended frequencies and attention factor when the config asks for them (architecture.md).
#pragma once

#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace moekit {

// Inverse frequencies theta^(-2j/d), or YaRN's blend of interpolated and extrapolated ones.
std::vector<float> rope_inv_freq(const ModelConfig& c);

struct RopeTable {
  Tensor cos, sin;  // [n_positions, rope_dim/2], already times the YaRN attention factor

  static RopeTable build(const ModelConfig& c, int64_t n_positions, Device device);
};

}  // namespace moekit
