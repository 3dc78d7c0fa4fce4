// Route logging (esft.md §1): runs the model over task samples in the ESFT training format and
// records, per MoE layer and sequence, the chosen experts and gate weights of every token, in the
// official `expert_weights_<layer>.txt` format that `moekit esft scores` reads.
#pragma once

#include <filesystem>

#include "model/deepseek.h"
#include "tokenizer/tokenizer.h"

namespace moekit {

struct RouteLogStats {
  int64_t sequences = 0, tokens = 0, layers = 0;
};

// data: JSONL rows with "messages" ([{"role", "content"}], the first user and assistant turns are
// used). Stops after `max_tokens` tokens (the last sequence is cut). Writes
// out_dir/expert_weights_<layer>.txt.
RouteLogStats log_routing(DeepSeekModel& model, const Tokenizer& tok,
                          const std::filesystem::path& data, int64_t max_tokens,
                          const std::filesystem::path& out_dir);

}  // namespace moekit
