// Byte-level BPE training with DeepSeek-V3's pre-tokenizer: count pre-tokenized words, then merge
// the most frequent adjacent pair until the vocabulary is full, updating pair counts only in
// the words a merge touches. Deterministic: ties go to the smaller (left id, right id) pair, and
// the same texts give a byte-identical tokenizer.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moekit {

struct BpeTrainOptions {
  int64_t vocab_size = 8192;  // specials + 256 bytes + merges
  int64_t min_frequency = 2;  // stop when the best pair is rarer than this
  // bos first, eos second (the trainer and templates rely on that order).
  std::vector<std::string> special_tokens = {
      "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜fim▁hole｜>",
      "<｜fim▁begin｜>",         "<｜fim▁end｜>",         "<｜User｜>",  "<｜Assistant｜>"};
};

struct BpeTrainStats {
  int64_t vocab_size = 0, merges = 0, unique_words = 0;
};

// Writes tokenizer.json (atomically).
BpeTrainStats train_bpe(const std::vector<std::string>& texts, const BpeTrainOptions& opt,
                        const std::filesystem::path& out_json);

// Texts from files: a .jsonl file gives each row's "text"; any other file is one text.
std::vector<std::string> read_training_texts(const std::vector<std::string>& files);

}  // namespace moekit
