// Expert relevance scores per layer (esft.md §2) and the official summary.json layout:
// token selection ratio r_i = count_i / (N K), average gate score g_i = sum_i weights / N.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "esft/routing_log.h"

namespace moekit {

struct ExpertScores {
  // layer -> per-expert score, both rounded to 4 decimals as the official files are.
  std::map<int, std::vector<double>> token, gate;
  int64_t n_experts = 0, top_k = 0;
};

// n_experts: max id + 1 over all layers (or larger when given).
ExpertScores compute_scores(const std::map<int, std::vector<SequenceRouting>>& logs, int64_t top_k,
                            int64_t n_experts = 0);
// {"token_scores": {"<layer>": {"<expert>": score}}, "gate_scores": ...} byte for byte as the
// official Python json.dumps output (layers in string order, Python float repr).
std::string summary_json(const ExpertScores& s);
ExpertScores read_summary(const std::filesystem::path& file);
// Python's repr of a float for the values these files hold (fixed notation, shortest digits).
std::string python_float(double v);

}  // namespace moekit
