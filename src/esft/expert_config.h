// ESFT expert selection (esft.md §3) and the expert config file it produces:
// {"experts": {"<layer>": [ids in selection order]}, "shared_experts": bool,
//  "non_expert_modules": bool}, byte for byte as the official files.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "esft/scores.h"

namespace moekit {

struct ExpertConfig {
  std::map<int, std::vector<int>> experts;  // layer -> chosen routed experts
  bool shared_experts = false;
  bool non_expert_modules = false;

  std::string to_json_text() const;  // the official layout (layers in string order)
};

// Per layer: experts by score, highest first (ties to the lower id), taken while the running
// sum of taken scores is below p; at least one. p in (0, 1].
ExpertConfig select_experts(const std::map<int, std::vector<double>>& scores, double top_p);

// Reads and validates an expert config's shape (layer keys, integer ids, boolean flags); errors
// name the file and the layer. Fine-tuning checks the layers and experts against the model.
ExpertConfig read_expert_config(const std::filesystem::path& file);

}  // namespace moekit
