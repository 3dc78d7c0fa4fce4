// Training data: documents from a corpus split (JSONL rows {"text": ..., "domain": ...}) become
// one token stream (bos + text + eos per document), cut into non-overlapping windows of seq+1
// tokens; a seeded per-epoch shuffle orders the windows. The sampler's whole state is one
// counter, so a checkpoint resumes the exact data order.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"

namespace moekit {

using EncodeFn = std::function<std::vector<int32_t>(std::string_view)>;

// Reads a JSONL split; every row needs a string "text" (errors name the file and line).
std::vector<int32_t> tokenize_jsonl(const std::filesystem::path& file, const EncodeFn& encode,
                                    int32_t bos, int32_t eos);
void save_tokens(const std::filesystem::path& file, const std::vector<int32_t>& tokens);
std::vector<int32_t> load_tokens(const std::filesystem::path& file);

struct Batch {
  Tensor ids, targets;  // I32 [batch * seq] each
  int64_t batch = 0, seq = 0;
};

class WindowSampler {
 public:
  WindowSampler(std::vector<int32_t> tokens, int64_t seq, uint64_t seed);
  int64_t windows() const { return n_windows_; }
  // The next `batch` windows in shuffled order (wrapping into a new epoch as needed).
  Batch next(int64_t batch);
  // The given windows of the unshuffled stream, in order (validation).
  Batch windows_batch(const std::vector<int64_t>& windows) const;
  int64_t position() const { return position_; }
  void set_position(int64_t p) { position_ = p; }

 private:
  int64_t window_of(int64_t counter);
  void fill(Batch& b, int64_t row, int64_t window) const;

  std::vector<int32_t> tokens_;
  int64_t seq_, n_windows_;
  uint64_t seed_;
  int64_t position_ = 0;
  int64_t epoch_cached_ = -1;
  std::vector<int64_t> order_;
};

}  // namespace moekit
