// Adapter fingerprint and application.
#include "esft/adapter.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"
#include "model/checkpoint.h"

namespace moekit {

std::string base_fingerprint(const DeepSeekModel& model, bool bf16_rounded) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  const std::string cfg = config_to_json(model.config()).dump();
  mix(cfg.data(), cfg.size());
  // The leading kHashed values of each tensor as fp32 bytes, whatever the storage dtype: a bf16
  // table (--dtype bf16) holds the same values as the fp32 table loaded from a bf16 checkpoint,
  // so both hash alike, and fp32 storage hashes the same 64 KiB it always did (adapters made
  // before bf16 tables keep their fingerprints). Only the rows holding them leave the device.
  constexpr int64_t kHashed = (int64_t(1) << 16) / 4;
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}) {
    const Tensor& v = model.params().at(name).value;
    const int64_t n = std::min(v.numel(), kHashed);
    const int64_t row = v.numel() / std::max<int64_t>(1, v.dim(0));  // values per row
    const int64_t rows = row > 0 ? (n + row - 1) / row : 0;
    const Tensor lead = v.slice(0, rows).to_host();
    Tensor f = lead.dtype() == DType::F32 ? lead : lead.to_f32();
    if (bf16_rounded) f = f.to_dtype(DType::BF16).to_f32();
    mix(f.raw(), size_t(n) * sizeof(float));
  }
  return fmt::format("{:016x}", h);
}

void apply_adapter(DeepSeekModel& model, const std::filesystem::path& dir) {
  const auto file = dir / "adapter.safetensors";
  SafetensorsFile a = SafetensorsFile::open(file);
  auto it = a.metadata().find("base_fingerprint");
  if (it == a.metadata().end())
    fail("{}: no base_fingerprint in the metadata (not a moekit adapter)", file.string());
  // The same base, possibly stored otherwise: trained and applied with the same storage (or on a
  // bf16 checkpoint, where fp32 and bf16 storage hold the same values); trained on a bf16 model of
  // an fp32 checkpoint and applied to the fp32 model (the recorded fingerprint is of the rounded
  // values); or trained in fp32 and applied to a bf16 model (base_fingerprint_bf16, recorded since
  // embeddings and LM heads can be bf16).
  const std::string want = base_fingerprint(model), want16 = base_fingerprint(model, true);
  auto it16 = a.metadata().find("base_fingerprint_bf16");
  const bool same = it->second == want || it->second == want16 ||
                    (it16 != a.metadata().end() && it16->second == want16);
  if (!same)
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
