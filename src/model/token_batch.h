// TokenBatch: a rectangular batch of token ids, read from the `moekit forward` input format
// {"ids": [[int, ...], ...]} with every problem reported against the file.
#pragma once

#include <filesystem>
#include <vector>

#include "core/tensor.h"

namespace moekit {

struct TokenBatch {
  int64_t batch = 0, seq = 0;
  Tensor ids;  // I32 [batch * seq]
};

// Errors (one line, naming the file): unreadable, not JSON, no "ids", not a non-empty list of
// non-empty lists of integers, ragged rows, ids outside [0, vocab_size).
TokenBatch read_ids_json(const std::filesystem::path& file, int64_t vocab_size);

}  // namespace moekit
