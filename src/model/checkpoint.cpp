// Checkpoint loading/saving with name mapping and validation.
#include "model/checkpoint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <regex>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"

namespace moekit {

namespace fs = std::filesystem;

namespace {

// Tensors a checkpoint may carry that this model does not use: DeepSeek-V3's multi-token-
// prediction layers (indices >= num_hidden_layers) and precomputed rotary tables.
bool ignorable(const std::string& name, const ModelConfig& c) {
  if (name.ends_with("rotary_emb.inv_freq")) return true;
  static const std::regex layer_re(R"(^model\.layers\.(\d+)\.)");
  std::smatch m;
  return std::regex_search(name, m, layer_re) && std::stoll(m[1]) >= c.num_hidden_layers;
}

void assign(Param& p, const Tensor& src, const std::string& file, const std::string& name) {
  if (!(src.shape() == p.value.shape()))
    fail("{}: tensor {} has shape {}, expected {}", file, name, src.shape().str(),
         p.value.shape().str());
  set_value(p, src);
}

// Expert e's slice of a fused transformers-5 tensor, as the per-expert parameter `which`.
bool assign_from_fused(Param& p, const std::map<std::string, SafetensorsEntry>& tensors,
                       std::set<std::string>& used) {
  static const std::regex re(R"(^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$)");
  std::smatch m;
  if (!std::regex_match(p.name, m, re)) return false;
  const std::string prefix = m[1];
  const int64_t e = std::stoll(m[2]);
  const std::string which = m[3];
  const std::string fused = prefix + (which == "down_proj" ? ".down_proj" : ".gate_up_proj");
  auto it = tensors.find(fused);
  if (it == tensors.end()) return false;
  const Tensor& t = it->second.tensor;
  const int64_t I = p.value.dim(which == "down_proj" ? 1 : 0);
  if (t.ndim() != 3 || e >= t.dim(0))
    fail("{}: fused tensor {} has shape {}, which has no expert {}", it->second.file, fused,
         t.shape().str(), e);
  Tensor slice = t.select(e);
  if (which == "gate_proj") slice = slice.slice(0, I);
  if (which == "up_proj") slice = slice.slice(I, 2 * I);
  assign(p, slice, it->second.file, fmt::format("{} (expert {} {})", fused, e, which));
  used.insert(fused);
  return true;
}

}  // namespace

bool format_has_balance_bias(const ModelConfig& c) {
  return c.topk_method == "noaux_tc";
}

std::vector<CheckpointTensor> checkpoint_layout(const ModelConfig& c) {
  const DeepSeekModel layout(c, Device::CPU, /*allocate=*/false);
  std::vector<CheckpointTensor> out;
  for (const auto& p : layout.params().all()) {
    if (p->buffer && !format_has_balance_bias(c)) continue;
    const TensorInit init = p->buffer                          ? TensorInit::Zeros
                            : p->name.ends_with("norm.weight") ? TensorInit::Ones
                                                               : TensorInit::Normal;
    out.push_back({p->name, p->shape, init});
  }
  return out;
}

void load_weights(DeepSeekModel& model, const std::map<std::string, SafetensorsEntry>& tensors,
                  const std::string& where) {
  std::set<std::string> used;
  const ModelConfig& c = model.config();
  for (auto& p : model.params().all()) {
    auto it = tensors.find(p->name);
    if (it != tensors.end()) {
      assign(*p, it->second.tensor, it->second.file, p->name);
      used.insert(p->name);
    } else if (assign_from_fused(*p, tensors, used)) {
      // read from the fused layout
    } else if (p->buffer && !format_has_balance_bias(c)) {
      p->value.fill(0.0f);  // V2 checkpoints have no balance bias: it starts at zero
    } else {
      fail("{}: missing tensor {}", where, p->name);
    }
  }
  for (const auto& [name, entry] : tensors)
    if (!used.count(name) && !ignorable(name, c))
      fail("{}: unexpected tensor {} (not part of a {} model with this config)", entry.file, name,
           c.model_type);
}

std::unique_ptr<DeepSeekModel> load_model(const fs::path& dir, Device device, DType matrix_dtype) {
  if (!fs::is_directory(dir)) fail("{}: not a model directory", dir.string());
  ModelConfig c = load_config(dir / "config.json");
  auto model = std::make_unique<DeepSeekModel>(c, device, true, matrix_dtype);
  load_weights(*model, load_checkpoint_tensors(dir), dir.string());
  return model;
}

void save_model(const DeepSeekModel& model, const fs::path& dir, DType dtype) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create directory ({})", dir.string(), ec.message());
  std::vector<std::pair<std::string, Tensor>> out;
  const ModelConfig& c = model.config();
  for (auto& p : model.params().all()) {
    const Tensor host =
        p->value.dtype() == DType::F32 ? p->value.to_host() : p->value.to_host().to_f32();
    // V2 has no balance bias tensor; write it only where the format has one or it was learned.
    if (p->buffer && !format_has_balance_bias(c)) {
      bool all_zero = true;
      for (int64_t i = 0; i < host.numel() && all_zero; ++i) all_zero = host.f32()[i] == 0.0f;
      if (all_zero) continue;
    }
    out.emplace_back(p->name, dtype == DType::F32 ? host : host.to_dtype(dtype));
  }
  ModelConfig saved = c;
  saved.torch_dtype = dtype == DType::BF16  ? "bfloat16"
                      : dtype == DType::F16 ? "float16"
                                            : "float32";
  save_safetensors(dir / "model.safetensors", out, {{"format", "pt"}});
  write_file_atomic(dir / "config.json", config_to_json(saved).dump(2) + "\n");
}

}  // namespace moekit
