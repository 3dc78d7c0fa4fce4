// ESFT adapters (esft.md §5): DIR/expert_config.json + DIR/adapter.safetensors holding only the
// trained tensors under their checkpoint names. Applying one overwrites those tensors of the base
// model; the adapter records a fingerprint of its base so it is never applied to another model.
#pragma once

#include <filesystem>
#include <string>

#include "model/deepseek.h"

namespace moekit {

// A hash of the base model's config and of the frozen tensors' leading values (embedding,
// LM head, norms): cheap for any model size, different for different weights.
std::string base_fingerprint(const DeepSeekModel& model);

// Overwrites the adapter's tensors in `model`; errors (naming the adapter file) for unknown
// tensors, wrong shapes or a fingerprint from another base.
void apply_adapter(DeepSeekModel& model, const std::filesystem::path& adapter_dir);

}  // namespace moekit
