// PCRE2-backed Split sequence.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/pretokenizer.h"

#include <pcre2.h>

#include "core/error.h"
#include "tokenizer/byte_level.h"

namespace moekit {

struct PreTokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
};

PreTokenizer::PreTokenizer(const std::vector<std::string>& patterns, const std::string& source)
    : patterns_(patterns) {
  for (size_t i = 0; i < patterns.size(); ++i) {
    int err = 0;
    PCRE2_SIZE off = 0;
    auto r = std::make_unique<Regex>();
    r->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(patterns[i].data()), patterns[i].size(),
                            PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &off, nullptr);
    if (!r->code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail("{}: pre_tokenizer regex {} does not compile at offset {}: {}", source, i, off,
           reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(r->code,
                      PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is absent
    regexes_.push_back(std::move(r));
  }
}

PreTokenizer::~PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;

void PreTokenizer::split(std::string_view text, std::vector<std::string_view>& out) const {
  size_t i = 0, run = 0;
  while (i < text.size()) {
    size_t n = utf8_valid_len(text, i);
    if (n) {
      i += n;
      continue;
    }
    if (i > run) split_valid(text.substr(run, i - run), out);
    out.push_back(text.substr(i, 1));  // an invalid byte stands alone
    run = ++i;
  }
  if (text.size() > run) split_valid(text.substr(run), out);
}

void PreTokenizer::split_valid(std::string_view text, std::vector<std::string_view>& out) const {
  std::vector<std::string_view> cur{text}, next;
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  for (const auto& re : regexes_) {
    next.clear();
    for (std::string_view piece : cur) {
      size_t gap = 0, search = 0;
      while (search < piece.size()) {
        int rc = pcre2_match(re->code, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(),
                             search, PCRE2_NO_UTF_CHECK, md, nullptr);
        if (rc < 0) break;
        PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        size_t b = ov[0], e = ov[1];
        if (e == b) {  // an empty match splits nothing: search on from the next character
          search = b + std::max<size_t>(1, utf8_valid_len(piece, b));
          continue;
        }
        if (b > gap) next.push_back(piece.substr(gap, b - gap));  // the gap before the match
        next.push_back(piece.substr(b, e - b));                   // the match, isolated
        gap = search = e;
      }
      if (gap < piece.size()) next.push_back(piece.substr(gap));
    }
    cur.swap(next);
  }
  pcre2_match_data_free(md);
  out.insert(out.end(), cur.begin(), cur.end());
}

std::vector<std::string> PreTokenizer::deepseek_v3_patterns() {
  return {
      R"(\p{N}{1,3})",
      "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
      "[!\"#$%&'()*+,\\-./"
      ":;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
      "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
  };
}

}  // namespace moekit
