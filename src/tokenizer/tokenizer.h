// Tokenizer: Hugging Face tokenizer.json byte-level BPE as DeepSeek uses it.
// encode: added/special tokens are found in the raw text first (longest match), the rest goes
// through the pre-tokenizer, then BPE merges by rank over bytes (with a per-piece cache).
// decode: token bytes concatenated (added tokens as their text).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/pretokenizer.h"

namespace moekit {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
};

// Hash that lets unordered_map<std::string, ...> be searched with a string_view (no allocation).
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

class Tokenizer {
 public:
  // Errors (one line naming the file and field): unreadable, not JSON, unsupported model type /
  // normalizer / pre-tokenizer / decoder, bad regex, merges naming tokens absent from the vocab.
  static Tokenizer load(const std::filesystem::path& tokenizer_json);

  // add_special prepends the beginning-of-sentence token (DeepSeek's add_bos_token).
  std::vector<int32_t> encode(std::string_view text, bool add_special = false) const;
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  std::optional<int32_t> token_to_id(std::string_view token) const;
  int64_t vocab_size() const { return int64_t(token_bytes_.size()); }
  const std::vector<AddedToken>& added_tokens() const { return added_; }

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

 private:
  Tokenizer();
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const;

  std::unique_ptr<PreTokenizer> pre_;
  std::vector<std::string> token_bytes_;  // id -> raw bytes (or added content)
  std::vector<uint8_t> is_special_;       // id -> special added token
  StringMap<int32_t> bytes_to_id_;        // raw bytes -> id (BPE vocab)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, merged)
  std::array<int32_t, 256> byte_id_{};
  std::vector<AddedToken> added_;
  std::vector<std::vector<size_t>> added_by_first_byte_;  // indices into added_, longest first
  StringMap<int32_t> token_strings_;                      // tokenizer.json token string -> id
  bool ignore_merges_ = false;
  int32_t bos_ = -1, eos_ = -1;
  struct Cache;
  std::unique_ptr<Cache> cache_;
};

}  // namespace moekit
