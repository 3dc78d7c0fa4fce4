// BPE trainer and its tokenizer.json writer.
#include "tokenizer/bpe_trainer.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "core/atomic_file.h"
#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pretokenizer.h"

namespace moekit {

using json = nlohmann::ordered_json;

namespace {

uint64_t key(int32_t a, int32_t b) {
  return (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
}

struct Word {
  std::vector<int32_t> sym;
  int64_t freq = 0;
};

struct Candidate {
  int64_t count;
  uint64_t pair;
  bool operator<(const Candidate& o) const {  // max-heap: larger count, then smaller pair
    return count != o.count ? count < o.count : pair > o.pair;
  }
};

json tokenizer_json(const std::vector<std::string>& token_bytes,
                    const std::vector<std::pair<int32_t, int32_t>>& merges,
                    const std::vector<std::string>& specials) {
  const int32_t n_special = int32_t(specials.size());
  json added = json::array();
  for (int32_t i = 0; i < n_special; ++i)
    added.push_back({{"id", i},
                     {"content", specials[size_t(i)]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  json split = json::array();
  for (const auto& p : PreTokenizer::deepseek_v3_patterns())
    split.push_back({{"type", "Split"},
                     {"pattern", {{"Regex", p}}},
                     {"behavior", "Isolated"},
                     {"invert", false}});
  split.push_back({{"type", "ByteLevel"},
                   {"add_prefix_space", false},
                   {"trim_offsets", true},
                   {"use_regex", false}});
  json vocab = json::object();
  for (int32_t i = 0; i < int32_t(token_bytes.size()); ++i)
    vocab[i < n_special ? specials[size_t(i)] : bytes_to_byte_level(token_bytes[size_t(i)])] = i;
  json merge_list = json::array();
  for (auto [a, b] : merges)
    merge_list.push_back(bytes_to_byte_level(token_bytes[size_t(a)]) + " " +
                         bytes_to_byte_level(token_bytes[size_t(b)]));
  const std::string& bos = specials[0];
  json bos_tok = {{"SpecialToken", {{"id", bos}, {"type_id", 0}}}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", {{"type", "Sequence"}, {"normalizers", json::array()}}},
          {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", split}}},
          {"post_processor",
           {{"type", "TemplateProcessing"},
            {"single", {bos_tok, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair",
             {bos_tok,
              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
              bos_tok,
              {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{bos, {{"id", bos}, {"ids", {0}}, {"tokens", {bos}}}}}}}},
          {"decoder",
           {{"type", "ByteLevel"},
            {"add_prefix_space", true},
            {"trim_offsets", true},
            {"use_regex", true}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", merge_list}}}};
}

}  // namespace

BpeTrainStats train_bpe(const std::vector<std::string>& texts, const BpeTrainOptions& opt,
                        const std::filesystem::path& out_json) {
  const int32_t n_special = int32_t(opt.special_tokens.size());
  if (n_special < 2) fail("tokenizer train: needs at least bos and eos special tokens");
  if (opt.vocab_size < n_special + 256)
    fail("tokenizer train: --vocab-size must be at least {} (specials + 256 bytes)",
         n_special + 256);

  // 1. Word frequencies.
  PreTokenizer pre(PreTokenizer::deepseek_v3_patterns(), "built-in pre-tokenizer");
  std::unordered_map<std::string, int64_t> counts;
  std::vector<std::string_view> pieces;
  for (const auto& t : texts) {
    pieces.clear();
    pre.split(t, pieces);
    for (auto p : pieces) ++counts[std::string(p)];
  }
  std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
  std::sort(sorted.begin(), sorted.end());  // fixed word order: determinism
  std::vector<std::string> token_bytes(static_cast<size_t>(n_special));
  for (int b = 0; b < 256; ++b) token_bytes.push_back(std::string(1, char(b)));
  std::vector<Word> words;
  words.reserve(sorted.size());
  for (auto& [w, f] : sorted) {
    Word word;
    word.freq = f;
    for (char c : w) word.sym.push_back(n_special + int32_t(uint8_t(c)));
    words.push_back(std::move(word));
  }

  // 2. Pair counts and where each pair occurs.
  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> where;
  for (int32_t w = 0; w < int32_t(words.size()); ++w)
    for (size_t i = 0; i + 1 < words[size_t(w)].sym.size(); ++i) {
      uint64_t k = key(words[size_t(w)].sym[i], words[size_t(w)].sym[i + 1]);
      pair_count[k] += words[size_t(w)].freq;
      auto& v = where[k];
      if (v.empty() || v.back() != w) v.push_back(w);
    }
  std::priority_queue<Candidate> heap;
  for (auto& [k, c] : pair_count) heap.push({c, k});

  // 3. Merges.
  std::vector<std::pair<int32_t, int32_t>> merges;
  std::vector<int64_t> seen(words.size(), -1);
  while (int64_t(token_bytes.size()) < opt.vocab_size && !heap.empty()) {
    Candidate top = heap.top();
    heap.pop();
    auto it = pair_count.find(top.pair);
    if (it == pair_count.end() || it->second != top.count) continue;  // stale entry
    if (top.count < opt.min_frequency) break;
    const int32_t a = int32_t(top.pair >> 32), b = int32_t(uint32_t(top.pair));
    const int32_t merged = int32_t(token_bytes.size());
    token_bytes.push_back(token_bytes[size_t(a)] + token_bytes[size_t(b)]);
    merges.emplace_back(a, b);
    std::unordered_map<uint64_t, int64_t> delta;
    std::vector<int32_t> occ = std::move(where[top.pair]);
    where.erase(top.pair);
    for (int32_t w : occ) {
      if (seen[size_t(w)] == merged) continue;
      seen[size_t(w)] = merged;
      Word& word = words[size_t(w)];
      auto& s = word.sym;
      bool has = false;
      for (size_t i = 0; i + 1 < s.size() && !has; ++i) has = s[i] == a && s[i + 1] == b;
      if (!has) continue;
      for (size_t i = 0; i + 1 < s.size(); ++i) delta[key(s[i], s[i + 1])] -= word.freq;
      size_t o = 0;
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          s[o++] = merged;
          ++i;
        } else {
          s[o++] = s[i];
        }
      }
      s.resize(o);
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        uint64_t k = key(s[i], s[i + 1]);
        delta[k] += word.freq;
        if (s[i] == merged || s[i + 1] == merged) {
          auto& v = where[k];
          if (v.empty() || v.back() != w) v.push_back(w);
        }
      }
    }
    // Apply count changes in a fixed order and queue the new counts.
    std::vector<std::pair<uint64_t, int64_t>> changes(delta.begin(), delta.end());
    std::sort(changes.begin(), changes.end());
    for (auto [k, d] : changes) {
      if (d == 0) continue;
      int64_t& c = pair_count[k];
      c += d;
      if (c <= 0)
        pair_count.erase(k);
      else
        heap.push({c, k});
    }
  }

  for (int32_t i = 0; i < n_special; ++i) token_bytes[size_t(i)] = opt.special_tokens[size_t(i)];
  json j = tokenizer_json(token_bytes, merges, opt.special_tokens);
  write_file_atomic(out_json, j.dump(1, ' ', false, json::error_handler_t::strict) + "\n");
  return {int64_t(token_bytes.size()), int64_t(merges.size()), int64_t(words.size())};
}

std::vector<std::string> read_training_texts(const std::vector<std::string>& files) {
  std::vector<std::string> texts;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) fail("{}: cannot read file", f);
    if (f.size() >= 6 && f.compare(f.size() - 6, 6, ".jsonl") == 0) {
      std::string line;
      int64_t n = 0;
      while (std::getline(in, line)) {
        ++n;
        if (line.empty()) continue;
        auto row = nlohmann::json::parse(line, nullptr, false);
        if (row.is_discarded() || !row.is_object() || !row.contains("text") ||
            !row["text"].is_string())
          fail("{}:{}: row has no string field \"text\"", f, n);
        texts.push_back(row["text"].get<std::string>());
      }
    } else {
      std::stringstream ss;
      ss << in.rdbuf();
      texts.push_back(ss.str());
    }
  }
  if (texts.empty()) fail("tokenizer train: no input text");
  return texts;
}

}  // namespace moekit
