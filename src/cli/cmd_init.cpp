// `moekit init`: a random-initialised Hugging Face checkpoint of any size from a config.json,
// streamed tensor by tensor (model/init.h); `--dry-run` prints the plan and writes nothing.
#include <fmt/format.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "cli/commands.h"
#include "core/error.h"
#include "model/init.h"
#include "model/summary.h"
#include "tokenizer/tokenizer.h"

namespace moekit::cli {

namespace fs = std::filesystem;

namespace {

struct InitArgs {
  std::string config, out, dtype = "bf16", tokenizer, shard_size = "5GB";
  uint64_t seed = 0;
  bool dry_run = false;
};

// "5GB", "500MB", "2GiB", "1048576": decimal units as transformers' max_shard_size, binary too.
uint64_t parse_size(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  const std::string unit = s.substr(i);
  static const std::pair<const char*, uint64_t> units[] = {{"", 1},
                                                           {"B", 1},
                                                           {"KB", 1000},
                                                           {"MB", 1000000},
                                                           {"GB", 1000000000},
                                                           {"KiB", 1ull << 10},
                                                           {"MiB", 1ull << 20},
                                                           {"GiB", 1ull << 30}};
  for (const auto& [name, mult] : units)
    if (i > 0 && i <= 15 && unit == name) {
      uint64_t v = 0;
      if (!__builtin_mul_overflow(std::stoull(s.substr(0, i)), mult, &v) && v > 0) return v;
    }
  fail("--shard-size: expected a positive size such as 5GB, 500MB or 1048576, got \"{}\"", s);
}

DType parse_dtype(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "f32" || s == "float32") return DType::F32;
  fail("--dtype: expected bf16 or f32, got \"{}\"", s);
}

std::string read_tokenizer(const std::string& file, const ModelConfig& c) {
  if (file.empty()) return "";
  const Tokenizer tok = Tokenizer::load(file);  // an Error naming the file if it is not one
  if (tok.vocab_size() > c.vocab_size)
    fail("{}: the tokenizer has {} tokens, more than the config's vocab_size {}", file,
         tok.vocab_size(), c.vocab_size);
  std::ifstream in(file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void print_plan(const InitArgs& a, const InitPlan& p) {
  const ModelConfig& c = p.config;
  fmt::print("config       {} ({}, {} layers, hidden {}, {} routed experts)\n", a.config,
             c.model_type, c.num_hidden_layers, c.hidden_size, c.n_routed_experts);
  fmt::print("parameters   {} ({})\n", p.params, human_count(double(p.params)));
  fmt::print("bytes        {} ({}, {} tensors in {}, {} file{})\n", p.total_bytes,
             human_bytes(double(p.total_bytes)), p.tensors.size(), dtype_name(p.options.dtype),
             p.shards.size(), p.shards.size() == 1 ? "" : "s + index");
  fmt::print("init         seed {}, normal std {} (norms 1, biases 0)\n", p.options.seed,
             c.initializer_range);
}

void run_init(const InitArgs& a) {
  if (a.out.empty() && !a.dry_run) fail("--out DIR is required (or --dry-run)");
  const ModelConfig c = load_config(a.config);
  InitOptions o;
  o.dtype = parse_dtype(a.dtype);
  o.seed = a.seed;
  o.shard_bytes = parse_size(a.shard_size);
  o.tokenizer_json = read_tokenizer(a.tokenizer, c);
  const InitPlan plan = plan_init(c, o);
  print_plan(a, plan);
  if (a.dry_run) return;
  check_init_target(plan, a.out);
  write_init(plan, a.out, true);
  fmt::print("wrote        {}\n", a.out);
}

}  // namespace

void add_init_commands(CLI::App& app) {
  auto a = std::make_shared<InitArgs>();
  auto* cmd = app.add_subcommand(
      "init", "Write a random-initialised Hugging Face checkpoint of any size from a config.json");
  cmd->add_option("--config", a->config, "config.json (deepseek_v2 or deepseek_v3)")->required();
  cmd->add_option("--out", a->out, "checkpoint directory to create");
  cmd->add_option("--dtype", a->dtype, "bf16 (default) or f32");
  cmd->add_option("--seed", a->seed, "random seed (default 0)");
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.json to copy into the checkpoint");
  cmd->add_option("--shard-size", a->shard_size,
                  "largest safetensors shard, e.g. 5GB (default), 500MB, 1048576");
  cmd->add_flag("--dry-run", a->dry_run, "print parameters and bytes; write nothing");
  cmd->callback([a] { run_init(*a); });
}

}  // namespace moekit::cli
