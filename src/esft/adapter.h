// ESFT adapters (esft.md §5): DIR/expert_config.json + DIR/adapter.safetensors holding only the
// trained tensors under their checkpoint names. Applying one overwrites those tensors of the base
// model; the adapter records a fingerprint of its base so it is never applied to another model.
#pragma once

#include <filesystem>
#include <string>

#include "model/deepseek.h"

namespace moekit {

// A hash of the base model's config and of the frozen tensors' leading values (embedding,
// LM head, final norm) as fp32: cheap for any model size, different for different weights, the
// same for the same values stored in fp32 or bf16. `bf16_rounded` hashes the values rounded to
// bf16 (what a bf16 model of this checkpoint holds).
std::string base_fingerprint(const DeepSeekModel& model, bool bf16_rounded = false);

// Overwrites the adapter's tensors in `model`; errors (naming the adapter file) for unknown
// tensors, wrong shapes or a fingerprint from another base. An adapter trained on the bf16 model
// of an fp32 checkpoint applies to the fp32 model and the other way round (metadata
// base_fingerprint_bf16).
void apply_adapter(DeepSeekModel& model, const std::filesystem::path& adapter_dir);

}  // namespace moekit
