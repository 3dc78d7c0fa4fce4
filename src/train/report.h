// The training report: reads a run's metrics.jsonl (and config.json) and renders `moekit report`'s
// HTML page with loss, learning-rate, MaxVio and throughput charts and expert-load heatmaps.
//
// metrics.jsonl: one JSON object per line, written by the trainer.
//   {"step": int, "loss": num, "lr": num, "maxvio": num, "tokens_per_s": num}   training rows
//   "val_loss": num                          on evaluation rows (which may omit the others)
//   "val_maxvio_global": num                 optional, drawn beside maxvio
//   "expert_load": [[int per expert] per MoE layer]   tokens per expert over the logging interval
// Other fields are ignored; null counts as absent (nlohmann writes NaN as null).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <vector>

#include "report/html_report.h"

namespace moekit {

struct MetricsRow {
  int64_t step = 0;
  std::optional<double> loss, lr, maxvio, tokens_per_s, val_loss, val_maxvio_global;
  std::vector<std::vector<double>> expert_load;  // [moe layer][expert]; empty when absent
};

// Parses every non-empty line; fails with "FILE:LINE: problem" on the first bad row, and with
// "FILE: ..." when the file is missing or has no rows.
std::vector<MetricsRow> read_metrics(const std::filesystem::path& file);

// load / mean(load) per layer (a layer with no tokens gives NaN cells).
std::vector<std::vector<double>> relative_load(const std::vector<std::vector<double>>& load);

// The whole page for run folder `run` (needs run/metrics.jsonl; run/config.json is optional).
HtmlReport build_run_report(const std::filesystem::path& run);

}  // namespace moekit
