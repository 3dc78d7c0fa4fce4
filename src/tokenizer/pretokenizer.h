// Pre-tokenizer: the `Sequence` of `Split` regexes (behavior Isolated) that DeepSeek's
// tokenizer.json applies before byte-level BPE. Each regex splits every piece from the previous
// step into matches and the gaps between them. Compiled with PCRE2 (UTF + UCP, JIT).
// Invalid UTF-8 cannot go through a UTF regex: each invalid byte becomes a piece of its own, so
// it still encodes (as its byte token) and decodes back to the same byte.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moekit {

class PreTokenizer {
 public:
  // `patterns` in order; `source` names the file for error messages.
  PreTokenizer(const std::vector<std::string>& patterns, const std::string& source);
  ~PreTokenizer();
  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;

  // Appends the pieces of `text` (views into it) to `out`.
  void split(std::string_view text, std::vector<std::string_view>& out) const;
  const std::vector<std::string>& patterns() const { return patterns_; }

  // DeepSeek-V3's three Split patterns (digits in threes, CJK/kana runs, the word/punctuation/
  // whitespace rule); moekit's own trained tokenizers use them too.
  static std::vector<std::string> deepseek_v3_patterns();

 private:
  struct Regex;
  void split_valid(std::string_view text, std::vector<std::string_view>& out) const;
  std::vector<std::string> patterns_;
  std::vector<std::unique_ptr<Regex>> regexes_;
};

}  // namespace moekit
