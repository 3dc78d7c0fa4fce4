// ESFT routing logs in the official format (esft.md §1): `expert_weights_<layer>.txt`, one line
// per sequence: every token's K expert ids (token-major), an empty field, then the matching gate
// weights, all tab-separated.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace moekit {

struct SequenceRouting {
  std::vector<int32_t> expert_ids;  // tokens * K
  std::vector<double> weights;      // same length
};

// One layer's log: all sequences. Errors name the file and line.
std::vector<SequenceRouting> read_routing_log(const std::filesystem::path& file);
void write_routing_log(const std::filesystem::path& file, const std::vector<SequenceRouting>& seqs);

// All `expert_weights_<layer>.txt` in a directory, by layer number.
std::map<int, std::vector<SequenceRouting>> read_routing_dir(const std::filesystem::path& dir);

// K (experts per token) from the data. Per line: the largest k dividing its id count such that
// every token's k ids are distinct (top-K never picks an expert twice; two tokens merged into one
// group would). K is the value most lines give.
int64_t infer_top_k(const std::map<int, std::vector<SequenceRouting>>& logs,
                    const std::string& where);
// Every line: id count a multiple of k and no expert twice in a token; errors name file and line.
void validate_top_k(const std::map<int, std::vector<SequenceRouting>>& logs, int64_t k,
                    const std::filesystem::path& dir);

}  // namespace moekit
