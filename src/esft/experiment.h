// The ESFT experiment (issue 7, part 6): for each task built from the corpus, log routing on the
// task's training data, compute scores, select experts by token and by gate score, then compare
// base / ESFT-token / ESFT-gate / full fine-tuning on the task metric, general retention (loss on
// the corpus validation split), trainable parameters, step time, peak memory and adapter size;
// plus the routing-dispersion analysis. Each fine-tuning run is a child `moekit finetune`
// process, which reports its own peak memory (VmHWM), not the experiment's.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "analysis/dispersion.h"

namespace moekit {

struct ExperimentOptions {
  std::filesystem::path model, corpus, out;
  std::filesystem::path moekit_binary = "/proc/self/exe";  // runs `moekit finetune`
  std::vector<std::string> tasks = {"translate", "arithmetic", "license"};
  std::vector<std::string> methods = {"esft-token", "esft-gate", "full"};
  int64_t steps = 150, seq = 256, batch = 4, route_tokens = 32768;
  int64_t max_train = 4000, max_eval = 200, retention_tokens = 16384;
  double lr = 1e-3, token_p = 0.2, gate_p = 0.1;
  uint64_t seed = 17;
};

struct MethodResult {
  std::string method;  // base | esft-token | esft-gate | full
  double accuracy = 0, general_loss = 0;
  int64_t correct = 0, total = 0, trainable_params = 0, experts = 0;
  double step_seconds = 0, tokens_per_s = 0, peak_rss_mib = 0, adapter_mib = 0, train_loss = 0;
  double state_mib = 0;  // gradients + AdamW moments
  std::vector<std::pair<std::string, std::string>> samples;
};

struct TaskResult {
  std::string task, description;
  int64_t train_items = 0, eval_items = 0;
  std::vector<MethodResult> methods;
  TaskDispersion dispersion;
};

struct ExperimentResult {
  std::vector<TaskResult> tasks;
  std::vector<std::vector<double>> overlap_50;  // task x task mean Jaccard of 50%-mass sets
};

// Runs the experiment; writes OUT/results.json, OUT/results.md and OUT/report.html.
ExperimentResult run_esft_experiment(const ExperimentOptions& opt);

// The comparison of one task as a Markdown table (also printed by `moekit demo`).
std::string comparison_table(const TaskResult& t);

}  // namespace moekit
