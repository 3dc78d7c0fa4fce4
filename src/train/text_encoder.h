// The tokenizer as the trainer sees it: text -> ids, plus the special ids and vocabulary size.
#pragma once

#include <filesystem>

#include "train/data.h"

namespace moekit {

struct TextEncoder {
  EncodeFn encode;
  int32_t bos = 0, eos = 1;
  int64_t vocab_size = 0;
};

// Loads a Hugging Face tokenizer.json.
TextEncoder load_text_encoder(const std::filesystem::path& tokenizer_json);

}  // namespace moekit
