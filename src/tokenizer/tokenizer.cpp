// tokenizer.json loading, encoding and decoding.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "tokenizer/byte_level.h"

namespace moekit {

using json = nlohmann::json;

// Piece -> ids memo, in shards with their own locks so threads encoding with one Tokenizer
// rarely wait on each other.
struct Tokenizer::Cache {
  static constexpr size_t kShards = 64;
  struct Shard {
    std::mutex mu;
    StringMap<std::vector<int32_t>> map;
  };
  std::array<Shard, kShards> shards;
  Shard& shard(std::string_view piece) { return shards[StringHash{}(piece) % kShards]; }
};

Tokenizer::Tokenizer() : cache_(std::make_unique<Cache>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

namespace {

uint64_t pair_key(int32_t a, int32_t b) {
  return (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
}

std::vector<std::string> split_patterns(const json& pt, const std::string& src) {
  std::vector<json> steps;
  if (pt.is_null()) return {};
  if (!pt.is_object() || !pt.contains("type"))
    fail("{}: field \"pre_tokenizer\": not an object with a type", src);
  if (pt["type"] == "Sequence") {
    if (!pt.contains("pretokenizers") || !pt["pretokenizers"].is_array())
      fail("{}: field \"pre_tokenizer.pretokenizers\": expected a list", src);
    for (const auto& s : pt["pretokenizers"]) steps.push_back(s);
  } else {
    steps.push_back(pt);
  }
  std::vector<std::string> patterns;
  for (size_t i = 0; i < steps.size(); ++i) {
    const json& s = steps[i];
    const std::string type = s.value("type", "");
    if (type == "Split") {
      if (!s.contains("pattern") || !s["pattern"].is_object() || !s["pattern"].contains("Regex"))
        fail("{}: pre_tokenizer step {}: Split needs a {{\"Regex\": ...}} pattern", src, i);
      if (s.value("behavior", "") != "Isolated" || s.value("invert", false))
        fail("{}: pre_tokenizer step {}: only Split with behavior Isolated is supported", src, i);
      patterns.push_back(s["pattern"]["Regex"].get<std::string>());
    } else if (type == "ByteLevel") {
      if (s.value("use_regex", true) || s.value("add_prefix_space", false))
        fail(
            "{}: pre_tokenizer step {}: ByteLevel with use_regex or add_prefix_space is not "
            "supported",
            src, i);
    } else {
      fail("{}: pre_tokenizer step {}: type \"{}\" is not supported", src, i, type);
    }
  }
  return patterns;
}

}  // namespace

Tokenizer Tokenizer::load(const std::filesystem::path& path) {
  const std::string src = path.string();
  std::ifstream in(path);
  if (!in) fail("{}: cannot read file", src);
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("{}: not a JSON object", src);
  if (!j.contains("model") || !j["model"].is_object()) fail("{}: field \"model\" is missing", src);
  const json& m = j["model"];
  if (m.value("type", "BPE") != "BPE")
    fail("{}: field \"model.type\": \"{}\" is not supported (BPE only)", src, m.value("type", ""));
  if (!m.contains("vocab") || !m["vocab"].is_object())
    fail("{}: field \"model.vocab\": expected an object", src);
  if (!m.contains("merges") || !m["merges"].is_array())
    fail("{}: field \"model.merges\": expected a list", src);
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    const json& n = j["normalizer"];
    if (!(n.value("type", "") == "Sequence" && n.contains("normalizers") &&
          n["normalizers"].empty()))
      fail("{}: field \"normalizer\": \"{}\" is not supported (none or an empty Sequence)", src,
           n.value("type", "?"));
  }
  if (j.contains("decoder") && !j["decoder"].is_null() &&
      j["decoder"].value("type", "") != "ByteLevel")
    fail("{}: field \"decoder\": \"{}\" is not supported (ByteLevel)", src,
         j["decoder"].value("type", "?"));

  Tokenizer t;
  t.pre_ =
      std::make_unique<PreTokenizer>(split_patterns(j.value("pre_tokenizer", json()), src), src);
  t.ignore_merges_ = m.value("ignore_merges", false);
  int64_t max_id = -1;
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0)
      fail("{}: model.vocab[\"{}\"]: expected a non-negative integer id", src, it.key());
    max_id = std::max(max_id, it.value().get<int64_t>());
  }
  const json& added_json = j.value("added_tokens", json::array());
  for (const auto& a : added_json) max_id = std::max(max_id, a.value("id", int64_t(-1)));
  t.token_bytes_.assign(size_t(max_id + 1), std::string());
  t.is_special_.assign(size_t(max_id + 1), 0);
  t.byte_id_.fill(-1);
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    const auto id = it.value().get<int32_t>();
    auto raw = byte_level_to_bytes(it.key());
    std::string bytes = raw ? *raw : it.key();  // tokens outside the alphabet are literal text
    t.token_bytes_[size_t(id)] = bytes;
    t.token_strings_[it.key()] = id;
    if (raw) {
      t.bytes_to_id_.emplace(bytes, id);
      if (bytes.size() == 1) t.byte_id_[uint8_t(bytes[0])] = id;
    }
  }
  for (int b = 0; b < 256; ++b)
    if (t.byte_id_[size_t(b)] < 0)
      fail("{}: model.vocab lacks the byte-level token for byte {}", src, b);
  const json& merges = m["merges"];
  for (size_t r = 0; r < merges.size(); ++r) {
    std::string a, b;
    if (merges[r].is_string()) {
      const std::string s = merges[r].get<std::string>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos)
        fail("{}: model.merges[{}]: \"{}\" is not two tokens", src, r, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (merges[r].is_array() && merges[r].size() == 2 && merges[r][0].is_string() &&
               merges[r][1].is_string()) {
      a = merges[r][0].get<std::string>();
      b = merges[r][1].get<std::string>();
    } else {
      fail("{}: model.merges[{}]: expected \"a b\" or [\"a\", \"b\"]", src, r);
    }
    auto ia = t.token_strings_.find(a), ib = t.token_strings_.find(b),
         iab = t.token_strings_.find(a + b);
    for (auto [it, name] : {std::pair{ia, &a}, {ib, &b}, {iab, nullptr}})
      if (it == t.token_strings_.end())
        fail("{}: model.merges[{}]: token \"{}\" is not in the vocabulary", src, r,
             name ? *name : a + b);
    t.merges_.emplace(pair_key(ia->second, ib->second), std::pair{int32_t(r), iab->second});
  }
  t.added_by_first_byte_.assign(256, {});
  for (const auto& a : added_json) {
    if (!a.contains("id") || !a.contains("content") || !a["content"].is_string())
      fail("{}: added_tokens: every entry needs an id and a content string", src);
    AddedToken tok{a["id"].get<int32_t>(), a["content"].get<std::string>(),
                   a.value("special", false)};
    if (tok.content.empty()) fail("{}: added_tokens: token {} has empty content", src, tok.id);
    t.token_bytes_[size_t(tok.id)] = tok.content;
    t.is_special_[size_t(tok.id)] = tok.special;
    t.token_strings_[tok.content] = tok.id;
    t.added_by_first_byte_[uint8_t(tok.content[0])].push_back(t.added_.size());
    t.added_.push_back(tok);
  }
  for (auto& v : t.added_by_first_byte_)  // longest first, then lower id
    std::sort(v.begin(), v.end(), [&](size_t x, size_t y) {
      const auto &a = t.added_[x], &b = t.added_[y];
      return a.content.size() != b.content.size() ? a.content.size() > b.content.size()
                                                  : a.id < b.id;
    });
  // bos/eos: DeepSeek's names, else the first two special added tokens.
  auto find = [&](const char* s) {
    auto it = t.token_strings_.find(s);
    return it == t.token_strings_.end() ? -1 : it->second;
  };
  t.bos_ = find("<｜begin▁of▁sentence｜>");
  t.eos_ = find("<｜end▁of▁sentence｜>");
  return t;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  auto it = token_strings_.find(token);
  if (it == token_strings_.end()) return std::nullopt;
  return it->second;
}

void Tokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    auto it = bytes_to_id_.find(piece);
    if (it != bytes_to_id_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  Cache::Shard& shard = cache_->shard(piece);
  {
    std::lock_guard lk(shard.mu);
    auto it = shard.map.find(piece);
    if (it != shard.map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> sym;
  sym.reserve(piece.size());
  for (char c : piece) sym.push_back(byte_id_[uint8_t(c)]);
  // Merge the lowest-ranked adjacent pair, all its non-overlapping occurrences left to right,
  // until no pair has a merge.
  while (sym.size() > 1) {
    int32_t best = INT32_MAX, a = -1, b = -1, merged = -1;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = merges_.find(pair_key(sym[i], sym[i + 1]));
      if (it != merges_.end() && it->second.first < best) {
        best = it->second.first;
        a = sym[i];
        b = sym[i + 1];
        merged = it->second.second;
      }
    }
    if (merged < 0) break;
    size_t w = 0;
    for (size_t i = 0; i < sym.size(); ++i) {
      if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
        sym[w++] = merged;
        ++i;
      } else {
        sym[w++] = sym[i];
      }
    }
    sym.resize(w);
  }
  out.insert(out.end(), sym.begin(), sym.end());
  std::lock_guard lk(shard.mu);
  if (shard.map.size() < (1u << 16)) shard.map.emplace(std::string(piece), std::move(sym));
}

void Tokenizer::encode_ordinary(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::vector<std::string_view> pieces;
  pre_->split(text, pieces);
  for (auto p : pieces) encode_piece(p, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int32_t> out;
  if (add_special && bos_ >= 0) out.push_back(bos_);
  size_t start = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto& cands = added_by_first_byte_[uint8_t(text[i])];
    for (size_t k : cands) {
      const auto& a = added_[k];
      if (text.compare(i, a.content.size(), a.content) == 0) {
        encode_ordinary(text.substr(start, i - start), out);
        out.push_back(a.id);
        i += a.content.size() - 1;
        start = i + 1;
        break;
      }
    }
  }
  encode_ordinary(text.substr(start), out);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || size_t(id) >= token_bytes_.size())
      fail("decode: token id {} outside the vocabulary ({})", id, token_bytes_.size());
    if (skip_special && is_special_[size_t(id)]) continue;
    out += token_bytes_[size_t(id)];
  }
  return out;
}

}  // namespace moekit
