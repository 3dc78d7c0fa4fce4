// ESFT / full fine-tuning loop and adapter output.
#include "esft/finetune.h"

#include <fmt/format.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>

#include "core/atomic_file.h"
#include "core/error.h"
#include "esft/adapter.h"
#include "esft/chat_rows.h"
#include "model/checkpoint.h"
#include "model/summary.h"
#include "tokenizer/templates.h"
#include "train/adamw.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

void apply_expert_config(DeepSeekModel& model, const ExpertConfig& cfg, const std::string& source) {
  const ModelConfig& c = model.config();
  for (const auto& [layer, experts] : cfg.experts) {
    if (layer >= c.num_hidden_layers || !c.is_moe_layer(layer))
      fail("{}: layer {} is not a MoE layer of this model ({} layers, first MoE layer {})", source,
           layer, c.num_hidden_layers, c.first_k_dense_replace);
    for (int e : experts)
      if (e >= c.n_routed_experts)
        fail("{}: layer {} names expert {}, the model has {}", source, layer, e,
             c.n_routed_experts);
  }
  static const std::regex expert_re(R"(^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.)");
  model.params().set_trainable([&](const Param& p) {
    std::smatch m;
    if (std::regex_search(p.name, m, expert_re)) {
      auto it = cfg.experts.find(std::stoi(m[1]));
      return it != cfg.experts.end() &&
             std::find(it->second.begin(), it->second.end(), std::stoi(m[2])) != it->second.end();
    }
    if (p.name.find(".mlp.shared_experts.") != std::string::npos) return cfg.shared_experts;
    return cfg.non_expert_modules;
  });
}

namespace {

struct Packed {
  std::vector<int32_t> ids, labels;  // [n_seq * seq]
  int64_t n_seq = 0;
};

// Packs samples into sequences of `seq` tokens; a random `drop` fraction of joins drops the next
// sample's bos; the last sequence is padded with eos (no loss).
Packed pack(const std::vector<EsftSample>& samples, int64_t seq, double drop, int32_t eos,
            std::mt19937_64& rng) {
  Packed p;
  std::vector<int32_t> ids, labels;
  std::bernoulli_distribution drop_bos(drop);
  for (size_t i = 0; i < samples.size(); ++i) {
    size_t start = (i > 0 && drop_bos(rng)) ? 1 : 0;
    ids.insert(ids.end(), samples[i].ids.begin() + long(start), samples[i].ids.end());
    labels.insert(labels.end(), samples[i].labels.begin() + long(start), samples[i].labels.end());
  }
  const int64_t n = (int64_t(ids.size()) + seq - 1) / seq;
  ids.resize(size_t(n * seq), eos);
  labels.resize(size_t(n * seq), -100);
  return {ids, labels, n};
}

std::vector<EsftSample> read_samples(const fs::path& data, const Tokenizer& tok) {
  std::vector<EsftSample> out;
  for (const ChatRow& r : read_chat_rows(data, true))
    out.push_back(esft_sample(tok, r.user, r.assistant));
  if (out.empty()) fail("{}: no training rows", data.string());
  return out;
}

// Mean loss of `count` packed rows from `first`; with `backward`, also the gradient.
double loss_on(DeepSeekModel& model, const Packed& p, int64_t first, int64_t count, int64_t seq,
               bool backward) {
  Tensor ids = Tensor::empty({count * seq}, DType::I32),
         labels = Tensor::empty({count * seq}, DType::I32);
  std::copy(p.ids.begin() + long(first * seq), p.ids.begin() + long((first + count) * seq),
            ids.i32());
  std::copy(p.labels.begin() + long(first * seq), p.labels.begin() + long((first + count) * seq),
            labels.i32());
  if (backward) return model.loss_and_backward(ids, labels, count, seq);
  return cross_entropy(backend(model.device()),
                       model.forward(ids, count, seq, /*backward_follows=*/false), labels);
}

// This process's resident-memory high-water mark (VmHWM: of this program's own address space,
// unlike getrusage's ru_maxrss, which keeps a spawning parent's peak across exec).
double peak_rss_mib() {
  std::ifstream in("/proc/self/status");
  std::string key;
  double kib = 0;
  while (in >> key)
    if (key == "VmHWM:" && in >> kib) return kib / 1024.0;
  return 0;
}

// The run's figures beside its output, for the experiment table and for users' scripts.
std::string result_json(const FinetuneOptions& opt, const FinetuneResult& r) {
  json j = {{"method", opt.method},
            {"steps", opt.steps},
            {"tokens_per_step", opt.seq * opt.batch * opt.accumulation},
            {"trainable_params", r.trainable_params},
            {"total_params", r.total_params},
            {"grad_bytes", r.grad_bytes},
            {"optimizer_bytes", r.optimizer_bytes},
            {"step_seconds", r.step_seconds},
            {"first_loss", r.first_loss},
            {"last_loss", r.last_loss},
            {"val_loss", r.val_loss},
            {"peak_rss_mib", peak_rss_mib()}};
  return j.dump(2) + "\n";
}

}  // namespace

FinetuneResult finetune_model(DeepSeekModel& model, const Tokenizer& tok,
                              const FinetuneOptions& opt) {
  model.params().allocate_grads();
  FinetuneResult res;
  res.total_params = model.params().numel();
  res.trainable_params = model.params().trainable_numel();
  res.grad_bytes = model.params().grad_bytes();

  std::mt19937_64 rng(opt.seed);
  std::vector<EsftSample> samples = read_samples(opt.data, tok);
  std::shuffle(samples.begin(), samples.end(), rng);
  const size_t n_val = std::max<size_t>(1, samples.size() / 50);  // 98 / 2
  std::vector<EsftSample> val(samples.begin(), samples.begin() + long(n_val)),
      train(samples.begin() + long(n_val), samples.end());
  if (train.empty()) fail("{}: too few rows for a 98/2 split", opt.data.string());
  Packed tr = pack(train, opt.seq, opt.random_concat_ratio, tok.eos_id(), rng);
  Packed va = pack(val, opt.seq, opt.random_concat_ratio, tok.eos_id(), rng);

  AdamW adam(AdamWConfig{0.9, 0.95, 1e-8, opt.weight_decay});
  fmt::print(
      "finetune ({}): {} of {} parameters train ({:.2f}%); gradients {:.1f} MiB + AdamW state "
      "{:.1f} MiB\n",
      opt.method, res.trainable_params, res.total_params,
      100.0 * double(res.trainable_params) / double(res.total_params),
      double(res.grad_bytes) / 1048576.0, 2.0 * double(res.grad_bytes) / 1048576.0);
  int64_t cursor = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= opt.steps; ++step) {
    model.params().zero_grads();
    double loss = 0;
    for (int64_t a = 0; a < opt.accumulation; ++a) {
      const int64_t first = cursor % tr.n_seq, count = std::min(opt.batch, tr.n_seq - first);
      cursor += count;
      loss += loss_on(model, tr, first, count, opt.seq, true) / double(opt.accumulation);
    }
    // The loss gradient of each micro-batch was averaged over its own tokens; average the sum.
    if (opt.accumulation > 1)
      for (auto& p : model.params().all())
        if (p->grad.defined())
          backend(p->grad.device()).scale(p->grad, 1.0f / float(opt.accumulation));
    clip_grad_norm(model.params(), opt.grad_clip);
    adam.step(model.params(), opt.lr);
    if (step == 1) res.first_loss = loss;
    res.last_loss = loss;
    if (step % opt.log_every == 0 || step == opt.steps)
      fmt::print("step {}/{} loss {:.4f}\n", step, opt.steps, loss);
  }
  res.step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                     double(opt.steps);
  res.optimizer_bytes = adam.state_bytes();
  for (int64_t i = 0; i < va.n_seq; ++i)
    res.val_loss += loss_on(model, va, i, 1, opt.seq, false) / double(va.n_seq);

  return res;
}

FinetuneResult finetune(const FinetuneOptions& opt) {
  if (opt.method != "esft" && opt.method != "full")
    fail("--method must be esft or full, got \"{}\"", opt.method);
  if (opt.method == "esft" && opt.experts.empty())
    fail("--method esft needs --experts CONFIG.json");
  if (opt.device != Device::CPU) {
    // Before any weight reaches the GPU: the trainable set from a layout-only model, then the
    // memory check for weights, gradients, AdamW state and activations.
    if (!fs::is_directory(opt.model)) fail("{}: not a model directory", opt.model.string());
    const ModelConfig c = load_config(opt.model / "config.json");
    DeepSeekModel layout(c, Device::CPU, /*allocate=*/false);
    if (opt.method == "esft")
      apply_expert_config(layout, read_expert_config(opt.experts), opt.experts.string());
    check_device_memory(
        estimate_memory(c, opt.batch * opt.seq, layout.params().trainable_numel(), opt.weights,
                        opt.activation_checkpointing, opt.recompute_experts),
        opt.device,
        fmt::format("{}: {} fine-tuning (batch {} x seq {})", opt.model.string(), opt.method,
                    opt.batch, opt.seq));
  }
  auto model = load_model(opt.model, opt.device, opt.weights);
  model->set_activation_checkpointing(opt.activation_checkpointing);
  model->set_expert_recompute(opt.recompute_experts);
  // Of the base, before any update; also of its values rounded to bf16, so a bf16 model of an
  // fp32 checkpoint accepts the adapter (apply_adapter).
  const std::string fingerprint = base_fingerprint(*model),
                    fingerprint_bf16 = base_fingerprint(*model, true);
  const fs::path tok_path = opt.tokenizer.empty() ? opt.model / "tokenizer.json" : opt.tokenizer;
  Tokenizer tok = Tokenizer::load(tok_path);
  ExpertConfig cfg;
  if (opt.method == "esft") {
    cfg = read_expert_config(opt.experts);
    apply_expert_config(*model, cfg, opt.experts.string());
  } else {  // everything trains: under --dtype bf16 every matrix gets its fp32 master
    model->params().set_trainable([](const Param&) { return true; });
  }
  FinetuneResult res = finetune_model(*model, tok, opt);

  // Output: an adapter (trained tensors only) for ESFT, a full checkpoint otherwise.
  std::error_code ec;
  fs::create_directories(opt.out, ec);
  if (ec) fail("{}: cannot create ({})", opt.out.string(), ec.message());
  if (opt.method == "esft") {
    std::vector<std::pair<std::string, Tensor>> trained;
    for (auto& p : model->params().all())
      if (p->trainable) trained.emplace_back(p->name, p->value);
    save_safetensors(opt.out / "adapter.safetensors", trained,
                     {{"format", "pt"},
                      {"moekit_adapter", "esft"},
                      {"base_fingerprint", fingerprint},
                      {"base_fingerprint_bf16", fingerprint_bf16}});
    write_file_atomic(opt.out / "expert_config.json", cfg.to_json_text());
  } else {
    save_model(*model, opt.out);
  }
  fs::copy_file(tok_path, opt.out / "tokenizer.json", fs::copy_options::overwrite_existing);
  write_file_atomic(opt.out / "finetune.json", result_json(opt, res));
  return res;
}

}  // namespace moekit
