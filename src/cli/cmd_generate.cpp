// `moekit generate`: text in, streamed text out, over the MLA latent KV cache.
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "esft/adapter.h"
#include "infer/generator.h"
#include "model/checkpoint.h"
#include "model/summary.h"
#include "tokenizer/tokenizer.h"

namespace moekit::cli {

namespace {

// Prints the text of newly generated tokens, holding back an incomplete UTF-8 tail until the
// bytes that finish it arrive.
class TextStream {
 public:
  explicit TextStream(const Tokenizer& tok) : tok_(tok) {}
  void push(int32_t id) {
    ids_.push_back(id);
    std::string text = tok_.decode(ids_);
    size_t stable = complete_utf8_prefix(text);
    if (stable > printed_) {
      std::fwrite(text.data() + printed_, 1, stable - printed_, stdout);
      std::fflush(stdout);
      printed_ = stable;
    }
  }
  void finish() {
    std::string text = tok_.decode(ids_);
    if (text.size() > printed_)
      std::fwrite(text.data() + printed_, 1, text.size() - printed_, stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }

 private:
  static size_t complete_utf8_prefix(const std::string& s) {
    size_t n = s.size(), i = n;
    // Walk back over at most 3 continuation bytes to the last lead byte.
    while (i > 0 && n - i < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i;
    if (i == 0) return n;
    unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    return (n - (i - 1) >= need) ? n : i - 1;
  }
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  size_t printed_ = 0;
};

}  // namespace

void add_generate_commands(CLI::App& app) {
  struct Args {
    std::string model, prompt, tokenizer, adapter;
    DeviceArgs device;
    SamplingParams p;
    int64_t max_context = 2048;
    bool no_bos = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt (streams to stdout)");
  cmd->add_option("--model", a->model, "checkpoint directory")->required();
  cmd->add_option("--prompt", a->prompt, "prompt text")->required();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.json (default MODEL/tokenizer.json)");
  cmd->add_option("--max-tokens", a->p.max_tokens, "new tokens at most")->capture_default_str();
  cmd->add_option("--temperature", a->p.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a->p.top_k, "sample among the k most likely (0 = all)")
      ->capture_default_str();
  cmd->add_option("--top-p", a->p.top_p, "nucleus sampling mass")->capture_default_str();
  cmd->add_option("--seed", a->p.seed, "sampling seed")->capture_default_str();
  cmd->add_option("--max-context", a->max_context, "KV cache capacity in tokens")
      ->capture_default_str();
  cmd->add_option("--adapter", a->adapter, "ESFT adapter directory to apply at load");
  cmd->add_flag("--no-bos", a->no_bos, "do not prepend the beginning-of-sentence token");
  add_device_options(cmd, a->device);
  cmd->callback([a] {
    if (a->p.temperature < 0) fail("--temperature must be >= 0");
    if (a->p.top_p <= 0 || a->p.top_p > 1) fail("--top-p must be in (0, 1]");
    const Device device = parse_device(a->device);
    if (device != Device::CPU) {  // weights and the KV cache, before any weight is copied
      if (!std::filesystem::is_directory(a->model)) fail("{}: not a model directory", a->model);
      const ModelConfig c = load_config(std::filesystem::path(a->model) / "config.json");
      MemoryEstimate need = estimate_memory(c, 1, 0, weight_dtype(a->device));
      need.activations += double(a->max_context) * double(summarize(c).kv_cache_per_token) * 4.0;
      check_device_memory(need, device, fmt::format("{}: generate", a->model));
    }
    auto model = load_model(a->model, device, weight_dtype(a->device));
    if (!a->adapter.empty()) apply_adapter(*model, a->adapter);
    const std::string tpath = a->tokenizer.empty() ? a->model + "/tokenizer.json" : a->tokenizer;
    Tokenizer tok = Tokenizer::load(tpath);
    std::vector<int32_t> prompt = tok.encode(a->prompt, !a->no_bos);
    if (tok.eos_id() >= 0) a->p.stop_ids = {tok.eos_id()};
    a->p.allowed_vocab = tok.vocab_size();
    Generator gen(*model, a->max_context);
    TextStream stream(tok);
    std::fwrite(a->prompt.data(), 1, a->prompt.size(), stdout);
    gen.generate(prompt, a->p, [&](int32_t id) {
      stream.push(id);
      return true;
    });
    stream.finish();
    if (!gen.unrecorded_reason().empty())
      fmt::print(stderr,
                 "moekit generate: the decode steps ran op by op, not as a CUDA graph ({})\n",
                 gen.unrecorded_reason());
  });
}

}  // namespace moekit::cli
