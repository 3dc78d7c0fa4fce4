// Adapter fingerprint and application.
#include "esft/adapter.h"

#include <fmt/format.h>

#include "core/error.h"
#include "model/checkpoint.h"

namespace moekit {

std::string base_fingerprint(const DeepSeekModel& model) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  const std::string cfg = config_to_json(model.config()).dump();
  mix(cfg.data(), cfg.size());
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}) {
    const Tensor host = model.params().at(name).value.to_host();
    mix(host.raw(), std::min<size_t>(host.nbytes(), 1 << 16));
  }
  return fmt::format("{:016x}", h);
}

void apply_adapter(DeepSeekModel& model, const std::filesystem::path& dir) {
  const auto file = dir / "adapter.safetensors";
  SafetensorsFile a = SafetensorsFile::open(file);
  auto it = a.metadata().find("base_fingerprint");
  if (it == a.metadata().end())
    fail("{}: no base_fingerprint in the metadata (not a moekit adapter)", file.string());
  const std::string want = base_fingerprint(model);
  if (it->second != want)
    fail("{}: adapter was trained on another base model (fingerprint {}, this model {})",
         file.string(), it->second, want);
  for (const auto& [name, e] : a.tensors()) {
    Param* p = model.params().find(name);
    if (!p) fail("{}: tensor {} is not in the base model", file.string(), name);
    if (!(p->value.shape() == e.tensor.shape()))
      fail("{}: tensor {} has shape {}, the base model's is {}", file.string(), name,
           e.tensor.shape().str(), p->value.shape().str());
    set_value(*p, e.tensor);
  }
}

}  // namespace moekit
