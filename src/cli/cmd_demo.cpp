// `moekit demo`: the main job on the embedded default. Builds the corpus if absent, trains a
// byte-level BPE tokenizer on it, pretrains a small DeepSeekMoE (MLA, fine-grained routed +
// shared experts, Loss-Free Balancing), prints validation perplexity and MaxVio, generates a
// sample per domain and writes the HTML report, then specialises the model on one corpus task
// with ESFT and full fine-tuning and prints the comparison. Re-running resumes the pretraining
// from the run's checkpoints.
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "esft/experiment.h"
#include "infer/generator.h"
#include "model/checkpoint.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/tokenizer.h"
#include "train/report.h"
#include "train/trainer.h"

namespace moekit::cli {

namespace fs = std::filesystem;

namespace {

struct DemoArgs {
  std::string corpus = "corpus", out = "runs/demo", source = MOEKIT_SOURCE_DIR;
  int64_t steps = 400, vocab = 4096, batch = 16, seq = 128;
  std::string esft_task = "license";  // the ESFT step's task ("" skips it)
  int64_t esft_steps = 100;
  uint64_t seed = 0;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void ensure_corpus(const DemoArgs& a) {
  if (fs::exists(fs::path(a.corpus) / "train.jsonl")) return;
  const fs::path script = fs::path(a.source) / "scripts/corpus";
  fmt::print("[1/6] building the corpus with {} ...\n", script.string());
  std::fflush(stdout);
  const std::string cmd = "bash '" + script.string() + "' '" + a.corpus + "'";
  if (std::system(cmd.c_str()) != 0) fail("{}: corpus build failed", script.string());
}

std::vector<std::string> corpus_texts(const fs::path& jsonl) {
  std::ifstream in(jsonl);
  if (!in) fail("{}: cannot read", jsonl.string());
  std::vector<std::string> texts;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) texts.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
  return texts;
}

// Specialises the pretrained model on one corpus task: routing -> expert selection ->
// ESFT-token / ESFT-gate / full fine-tuning -> task accuracy and general retention.
void run_esft_step(const DemoArgs& a, const fs::path& base) {
  fmt::print("[5/6] ESFT on the {} task: route, select experts, fine-tune, evaluate\n",
             a.esft_task);
  std::fflush(stdout);
  ExperimentOptions eo;
  eo.model = base;
  eo.corpus = a.corpus;
  eo.out = fs::path(a.out) / "esft";
  eo.tasks = {a.esft_task};
  eo.steps = a.esft_steps;
  ExperimentResult er = run_esft_experiment(eo);
  fmt::print("\n{}\n      ESFT report (routing heatmaps): {}\n", comparison_table(er.tasks.front()),
             (eo.out / "report.html").string());
}

void run_demo(const DemoArgs& a) {
  const auto t0 = std::chrono::steady_clock::now();
  ensure_corpus(a);
  fs::create_directories(a.out);
  const fs::path tok_path = fs::path(a.out) / "tokenizer.json";
  if (!fs::exists(tok_path)) {
    fmt::print("[2/6] training a {}-token byte-level BPE tokenizer on {}/train.jsonl ...\n",
               a.vocab, a.corpus);
    std::fflush(stdout);
    auto t = std::chrono::steady_clock::now();
    BpeTrainOptions bo;
    bo.vocab_size = a.vocab;
    train_bpe(corpus_texts(fs::path(a.corpus) / "train.jsonl"), bo, tok_path);
    fmt::print("      done in {:.1f} s\n", seconds_since(t));
  }

  fmt::print(
      "[3/6] pretraining a DeepSeekMoE (configs/moekit-demo.json) with Loss-Free Balancing\n");
  TrainOptions o;
  o.config_file = fs::path(a.source) / "configs/moekit-demo.json";
  o.data_dir = a.corpus;
  o.tokenizer = tok_path;
  o.out = fs::path(a.out) / "pretrain";
  o.steps = a.steps;
  o.seed = a.seed;
  o.batch = a.batch;
  o.seq = a.seq;
  o.lr = 3e-3;
  o.warmup = 30;
  o.log_every = 10;
  o.eval_every = 100;
  o.eval_batches = 16;
  o.save_every = 100;
  o.resume = true;  // a second `moekit demo` continues (or reuses) the first one's run
  TrainResult r = train(o);

  fmt::print(
      "[4/6] validation: loss {:.3f}, perplexity {:.2f}; MaxVio global {:.3f}, per batch {:.3f}\n",
      r.val_loss, std::exp(r.val_loss), r.val_maxvio_global, r.val_maxvio_batch);
  auto model = load_model(r.final_dir);
  Tokenizer tok = Tokenizer::load(tok_path);
  const std::vector<std::pair<std::string, std::string>> prompts = {
      {"literature", "And God said"},
      {"legal", "Permission is hereby granted"},
      {"code", "#include <"},
      {"arithmetic", "4541 + 9306 ="},
      {"dictionary", "house : "}};
  Generator gen(*model, 256);
  SamplingParams sp;
  sp.max_tokens = 32;
  sp.stop_ids = {tok.eos_id()};
  sp.allowed_vocab = tok.vocab_size();
  for (const auto& [domain, prompt] : prompts) {
    gen.reset();
    auto ids = gen.generate(tok.encode(prompt, true), sp);
    std::string text = tok.decode(ids);
    for (char& ch : text)
      if (ch == '\n') ch = ' ';
    fmt::print("      {:<10} {}{}\n", domain, prompt, text);
  }
  const fs::path report = fs::path(a.out) / "report.html";
  build_run_report(o.out).write(report);
  fmt::print("      training report: {}\n", report.string());
  if (!a.esft_task.empty()) run_esft_step(a, r.final_dir);
  fmt::print("[6/6] done in {:.0f} s\n", seconds_since(t0));
}

}  // namespace

void add_demo_commands(CLI::App& app) {
  auto a = std::make_shared<DemoArgs>();
  auto* cmd = app.add_subcommand(
      "demo", "The main job: corpus -> tokenizer -> pretrain -> samples -> report");
  cmd->add_option("--corpus", a->corpus, "corpus directory (built if absent)")
      ->capture_default_str();
  cmd->add_option("--out", a->out, "output directory")->capture_default_str();
  cmd->add_option("--steps", a->steps, "pretraining steps")->capture_default_str();
  cmd->add_option("--vocab-size", a->vocab, "tokenizer vocabulary")->capture_default_str();
  cmd->add_option("--batch", a->batch, "sequences per step")->capture_default_str();
  cmd->add_option("--seq", a->seq, "sequence length")->capture_default_str();
  cmd->add_option("--seed", a->seed)->capture_default_str();
  cmd->add_option("--esft-task", a->esft_task,
                  "task of the ESFT step: translate, arithmetic, license (\"\" skips)")
      ->capture_default_str();
  cmd->add_option("--esft-steps", a->esft_steps, "fine-tuning steps per method")
      ->capture_default_str();
  cmd->add_option("--source", a->source, "moekit source tree (configs/, scripts/)")
      ->capture_default_str();
  cmd->callback([a] { run_demo(*a); });
}

}  // namespace moekit::cli
