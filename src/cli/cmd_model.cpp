// `moekit info` and `moekit forward`: inspect a checkpoint, run it on a batch of ids.
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "esft/adapter.h"
#include "model/checkpoint.h"
#include "model/summary.h"
#include "model/token_batch.h"

namespace moekit::cli {

namespace fs = std::filesystem;

namespace {

void run_info(const std::string& dir) {
  ModelConfig c = load_config(fs::path(dir) / "config.json");
  // Headers only (mmap): dtype and size on disk without converting any weight.
  auto tensors = load_checkpoint_tensors(dir);
  size_t bytes = 0;
  std::string dtype;
  for (const auto& [name, e] : tensors) {
    bytes += e.tensor.nbytes();
    std::string d(dtype_name(e.tensor.dtype()));
    if (dtype.empty())
      dtype = d;
    else if (dtype != d && dtype.find(d) == std::string::npos)
      dtype += "+" + d;
  }
  ModelSummary s = summarize(c);
  fmt::print("model        {} ({})\n", dir, c.model_type);
  fmt::print("architecture {} layers, hidden {}, {} heads, vocab {}\n", c.num_hidden_layers,
             c.hidden_size, c.num_attention_heads, c.vocab_size);
  fmt::print("attention    MLA: q_lora_rank {}, kv_lora_rank {}, qk_nope {}, qk_rope {}, v {}{}\n",
             c.q_lora_rank ? std::to_string(c.q_lora_rank) : "none", c.kv_lora_rank,
             c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
             c.rope_scaling.type == "yarn" ? fmt::format(", YaRN x{}", c.rope_scaling.factor) : "");
  fmt::print(
      "moe          {} routed + {} shared experts (width {}), top-{}, {} / {}, "
      "groups {}/{}, norm_topk_prob {}, scaling {}\n",
      c.n_routed_experts, c.n_shared_experts, c.moe_intermediate_size, c.num_experts_per_tok,
      c.scoring_func, c.topk_method, c.topk_group, c.n_group, c.norm_topk_prob,
      c.routed_scaling_factor);
  fmt::print(
      "parameters   {} total, {} active per token ({:.1f}%; {} without the input embedding, "
      "as DeepSeek counts)\n",
      human_count(double(s.total)), human_count(double(s.active)),
      100.0 * double(s.active) / double(s.total), human_count(double(s.active - s.embedding)));
  fmt::print("checkpoint   {} tensors, {}, {}\n", tensors.size(), dtype,
             human_bytes(double(bytes)));
  fmt::print("memory       weights bf16 {}, fp32 {}; full training (fp32 + grads + AdamW) {}\n",
             human_bytes(2.0 * double(s.total)), human_bytes(4.0 * double(s.total)),
             human_bytes(16.0 * double(s.total)));
  fmt::print("kv cache     {} values/token (MLA latent), {} per 1k tokens in bf16\n",
             s.kv_cache_per_token, human_bytes(2.0 * double(s.kv_cache_per_token) * 1024));
  fmt::print("layers       {:>5} {:>6} {:>12} {:>12} {:>12}\n", "index", "ffn", "attention",
             "ffn params", "ffn active");
  for (const auto& l : s.layers)
    fmt::print("             {:>5} {:>6} {:>12} {:>12} {:>12}\n", l.index, l.ffn,
               human_count(double(l.attention)), human_count(double(l.ffn_params)),
               human_count(double(l.ffn_active)));
}

void run_forward(const std::string& dir, const std::string& input, const std::string& out,
                 const std::string& adapter, Device device, DType weights) {
  if (device != Device::CPU) {  // before any weight reaches the GPU
    if (!fs::is_directory(dir)) fail("{}: not a model directory", dir);
    const ModelConfig c = load_config(fs::path(dir) / "config.json");
    const TokenBatch b = read_ids_json(input, c.vocab_size);
    check_device_memory(estimate_memory(c, b.batch * b.seq, 0, weights), device,
                        fmt::format("{}: forward (batch {} x seq {})", dir, b.batch, b.seq));
  }
  auto model = load_model(dir, device, weights);
  if (!adapter.empty()) apply_adapter(*model, adapter);
  TokenBatch b = read_ids_json(input, model->config().vocab_size);
  Tensor logits = model->forward(b.ids, b.batch, b.seq);
  Tensor targets = shifted_targets(b.ids, b.batch, b.seq);
  float loss = cross_entropy(backend(device), logits, targets);
  save_safetensors(out, {{"logits", logits.reshape({b.batch, b.seq, model->config().vocab_size})}});
  fmt::print("{{\"loss\": {:.9g}}}\n", loss);
}

}  // namespace

void add_model_commands(CLI::App& app) {
  auto* info =
      app.add_subcommand("info", "Describe a checkpoint: architecture, parameters, memory");
  auto info_dir = std::make_shared<std::string>();
  info->add_option("--model", *info_dir, "checkpoint directory (config.json + safetensors)")
      ->required();
  info->callback([info_dir] { run_info(*info_dir); });

  struct ForwardArgs {
    std::string dir, input, out, adapter;
    DeviceArgs device;
  };
  auto fa = std::make_shared<ForwardArgs>();
  auto* fwd = app.add_subcommand("forward", "Run a checkpoint on a batch of token ids");
  fwd->add_option("--model", fa->dir, "checkpoint directory")->required();
  fwd->add_option("--input", fa->input, "IDS.json: {\"ids\": [[int, ...], ...]} (rectangular)")
      ->required();
  fwd->add_option("--out", fa->out, "LOGITS.safetensors: F32 tensor `logits` [batch, seq, vocab]")
      ->required();
  fwd->add_option("--adapter", fa->adapter, "ESFT adapter directory to apply at load");
  add_device_options(fwd, fa->device);
  fwd->callback([fa] {
    run_forward(fa->dir, fa->input, fa->out, fa->adapter, parse_device(fa->device),
                weight_dtype(fa->device));
  });
}

}  // namespace moekit::cli
