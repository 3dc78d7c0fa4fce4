// RunDir: the layout of a training run directory and its atomic checkpoints.
//   RUN/config.json           the model config (a resume must match it)
//   RUN/metrics.jsonl         one JSON row per logged step
//   RUN/checkpoints/step-N/   model.safetensors (fp32 weights + balance biases),
//                             optimizer.safetensors (AdamW moments), state.json (step, data
//                             position, format version)
// A checkpoint is written into a hidden temp folder, fsync'ed, then renamed into place, so a
// crash or a full disk never leaves a partial step-N; older ones beyond `keep` are removed.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>

#include "model/deepseek.h"
#include "train/adamw.h"

namespace moekit {

struct RunState {
  int64_t step = 0;
  int64_t data_position = 0;
};

class RunDir {
 public:
  explicit RunDir(std::filesystem::path dir) : dir_(std::move(dir)) {}

  // Creates the run folder and writes config.json; with resume, checks the saved config equals
  // `cfg`; without resume, refuses a folder that already holds checkpoints.
  void prepare(const ModelConfig& cfg, bool resume);
  std::optional<std::filesystem::path> latest_checkpoint() const;
  RunState load_checkpoint(const std::filesystem::path& ckpt, DeepSeekModel& model,
                           AdamW& adam) const;
  void save_checkpoint(int64_t step, int64_t data_position, const DeepSeekModel& model,
                       const AdamW& adam, int64_t keep) const;
  void append_metrics(const nlohmann::json& row) const;
  // Drops metric rows after `step` (a resumed run rewrites them identically).
  void truncate_metrics(int64_t step) const;

 private:
  std::filesystem::path dir_;
};

}  // namespace moekit
