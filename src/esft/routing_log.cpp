// Parsing and writing of the official routing-log format (fast: from_chars, no streams).
#include "esft/routing_log.h"

#include <fmt/format.h>
#include <algorithm>
#include <charconv>
#include <fstream>
#include <regex>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"

namespace moekit {

namespace fs = std::filesystem;

std::vector<SequenceRouting> read_routing_log(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("{}: cannot read file", file.string());
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  std::vector<SequenceRouting> seqs;
  size_t pos = 0;
  int64_t lineno = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    SequenceRouting s;
    bool in_weights = false;
    size_t f = 0;
    while (f <= line.size()) {
      size_t tab = line.find('\t', f);
      if (tab == std::string_view::npos) tab = line.size();
      std::string_view field = line.substr(f, tab - f);
      f = tab + 1;
      if (field.empty()) {
        if (in_weights) fail("{}:{}: more than one empty field", file.string(), lineno);
        in_weights = true;
        continue;
      }
      if (!in_weights) {
        int32_t id = 0;
        auto r = std::from_chars(field.data(), field.data() + field.size(), id);
        if (r.ec != std::errc() || r.ptr != field.data() + field.size() || id < 0)
          fail("{}:{}: expert id \"{}\" is not a non-negative integer", file.string(), lineno,
               field);
        s.expert_ids.push_back(id);
      } else {
        double w = 0;
        auto r = std::from_chars(field.data(), field.data() + field.size(), w);
        if (r.ec != std::errc() || r.ptr != field.data() + field.size())
          fail("{}:{}: gate weight \"{}\" is not a number", file.string(), lineno, field);
        s.weights.push_back(w);
      }
    }
    if (!in_weights)
      fail("{}:{}: no empty field between expert ids and weights", file.string(), lineno);
    if (s.expert_ids.size() != s.weights.size())
      fail("{}:{}: {} expert ids but {} weights", file.string(), lineno, s.expert_ids.size(),
           s.weights.size());
    if (s.expert_ids.empty()) fail("{}:{}: no tokens", file.string(), lineno);
    seqs.push_back(std::move(s));
  }
  if (seqs.empty()) fail("{}: empty routing log", file.string());
  return seqs;
}

void write_routing_log(const fs::path& file, const std::vector<SequenceRouting>& seqs) {
  std::string out;
  for (const auto& s : seqs) {
    for (int32_t id : s.expert_ids) out += fmt::format("{}\t", id);
    for (size_t i = 0; i < s.weights.size(); ++i) out += fmt::format("\t{}", s.weights[i]);
    out += "\n";
  }
  write_file_atomic(file, out);
}

std::map<int, std::vector<SequenceRouting>> read_routing_dir(const fs::path& dir) {
  if (!fs::is_directory(dir)) fail("{}: routing directory not found", dir.string());
  static const std::regex name_re(R"(expert_weights_(\d+)\.txt)");
  std::map<int, std::vector<SequenceRouting>> logs;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (std::regex_match(name, m, name_re)) logs[std::stoi(m[1])] = read_routing_log(e.path());
  }
  if (logs.empty()) fail("{}: no expert_weights_<layer>.txt files", dir.string());
  return logs;
}

namespace {
// Largest k dividing the line's id count whose token groups hold distinct experts.
int64_t line_top_k(const SequenceRouting& s, int64_t max_k) {
  const int64_t n = int64_t(s.expert_ids.size());
  for (int64_t k = std::min(n, max_k); k >= 1; --k) {
    if (n % k) continue;
    bool ok = true;
    std::vector<int32_t> g;
    for (int64_t t = 0; t < n && ok; t += k) {
      g.assign(s.expert_ids.begin() + long(t), s.expert_ids.begin() + long(t + k));
      std::sort(g.begin(), g.end());
      ok = std::adjacent_find(g.begin(), g.end()) == g.end();
    }
    if (ok) return k;
  }
  return 1;
}
}  // namespace

int64_t infer_top_k(const std::map<int, std::vector<SequenceRouting>>& logs,
                    const std::string& where) {
  // The K most lines agree on; a ragged line then fails validate_top_k with its line number.
  int32_t max_id = 0;
  for (const auto& [layer, seqs] : logs)
    for (const auto& s : seqs)
      max_id = std::max(max_id, *std::max_element(s.expert_ids.begin(), s.expert_ids.end()));
  std::map<int64_t, int64_t> votes;
  for (const auto& [layer, seqs] : logs)
    for (const auto& s : seqs) ++votes[line_top_k(s, int64_t(max_id) + 1)];
  if (votes.empty()) fail("{}: no routing data", where);
  return std::max_element(votes.begin(), votes.end(),
                          [](auto& a, auto& b) { return a.second < b.second; })
      ->first;
}

void validate_top_k(const std::map<int, std::vector<SequenceRouting>>& logs, int64_t k,
                    const fs::path& dir) {
  for (const auto& [layer, seqs] : logs)
    for (size_t i = 0; i < seqs.size(); ++i) {
      const auto& ids = seqs[i].expert_ids;
      const std::string file = (dir / fmt::format("expert_weights_{}.txt", layer)).string();
      if (int64_t(ids.size()) % k)
        fail("{}:{}: {} expert ids is not a multiple of K = {} experts per token", file, i + 1,
             ids.size(), k);
      std::vector<int32_t> g;
      for (size_t t = 0; t < ids.size(); t += size_t(k)) {
        g.assign(ids.begin() + long(t), ids.begin() + long(t) + k);
        std::sort(g.begin(), g.end());
        if (std::adjacent_find(g.begin(), g.end()) != g.end())
          fail("{}:{}: token {} selects an expert twice (K = {})", file, i + 1, t / size_t(k), k);
      }
    }
}

}  // namespace moekit
