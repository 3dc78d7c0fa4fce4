// Score computation and the summary.json format.
#include "esft/scores.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace moekit {

namespace {
// Python's round(v, 4): the decimal rounding of v's exact binary value, read back as a double.
// (v * 1e4 rounded in floating point can land on the other side of a tie.)
double round4(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed, 4);
  double out = 0;
  std::from_chars(buf, r.ptr, out);
  return out;
}

// Layers in the order Python's sorted(os.listdir()) gives the files: by the string of the number.
std::vector<int> string_order(const std::map<int, std::vector<double>>& m) {
  std::vector<int> keys;
  for (const auto& [k, v] : m) keys.push_back(k);
  std::sort(keys.begin(), keys.end(),
            [](int a, int b) { return std::to_string(a) < std::to_string(b); });
  return keys;
}
}  // namespace

std::string python_float(double v) {
  if (v == 0.0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed);
  std::string s(buf, r.ptr);
  if (std::abs(v) < 1e-4 || std::abs(v) >= 1e16) {  // Python switches to exponent notation
    r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
    s.assign(buf, r.ptr);
    return s;
  }
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

ExpertScores compute_scores(const std::map<int, std::vector<SequenceRouting>>& logs, int64_t top_k,
                            int64_t n_experts) {
  ExpertScores out;
  out.top_k = top_k;
  for (const auto& [layer, seqs] : logs)
    for (const auto& s : seqs)
      for (int32_t id : s.expert_ids) n_experts = std::max<int64_t>(n_experts, int64_t(id) + 1);
  out.n_experts = n_experts;
  for (const auto& [layer, seqs] : logs) {
    std::vector<double> count(size_t(n_experts), 0.0), weight(size_t(n_experts), 0.0);
    int64_t ids = 0;
    for (const auto& s : seqs) {
      ids += int64_t(s.expert_ids.size());
      for (size_t i = 0; i < s.expert_ids.size(); ++i) {
        count[size_t(s.expert_ids[i])] += 1.0;
        weight[size_t(s.expert_ids[i])] += s.weights[i];
      }
    }
    const double tokens = double(ids / top_k);
    auto& tok = out.token[layer];
    auto& gate = out.gate[layer];
    for (int64_t e = 0; e < n_experts; ++e) {
      tok.push_back(round4(count[size_t(e)] / (tokens * double(top_k))));
      gate.push_back(round4(weight[size_t(e)] / tokens));
    }
  }
  return out;
}

std::string summary_json(const ExpertScores& s) {
  auto block = [](const std::map<int, std::vector<double>>& m) {
    std::string out = "{";
    bool first_layer = true;
    for (int layer : string_order(m)) {
      out += (first_layer ? "\"" : ", \"") + std::to_string(layer) + "\": {";
      first_layer = false;
      const auto& v = m.at(layer);
      for (size_t e = 0; e < v.size(); ++e)
        out += (e ? ", \"" : "\"") + std::to_string(e) + "\": " + python_float(v[e]);
      out += "}";
    }
    return out + "}";
  };
  return "{\"token_scores\": " + block(s.token) + ", \"gate_scores\": " + block(s.gate) + "}";
}

ExpertScores read_summary(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot read file", file.string());
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("{}: not a JSON object", file.string());
  ExpertScores out;
  for (const char* key : {"token_scores", "gate_scores"}) {
    if (!j.contains(key) || !j[key].is_object())
      fail("{}: field \"{}\" is missing or not an object", file.string(), key);
    auto& dst = std::string(key) == "token_scores" ? out.token : out.gate;
    for (auto it = j[key].begin(); it != j[key].end(); ++it) {
      int layer = 0;
      auto r = std::from_chars(it.key().data(), it.key().data() + it.key().size(), layer);
      if (r.ec != std::errc() || !it.value().is_object())
        fail("{}: {}[\"{}\"]: expected a layer number with an object of expert scores",
             file.string(), key, it.key());
      std::vector<double> v(it.value().size(), -1.0);
      for (auto e = it.value().begin(); e != it.value().end(); ++e) {
        size_t id = 0;
        auto re = std::from_chars(e.key().data(), e.key().data() + e.key().size(), id);
        if (re.ec != std::errc() || id >= v.size() || !e.value().is_number())
          fail("{}: {}[\"{}\"][\"{}\"]: expected expert ids 0..{} with numeric scores",
               file.string(), key, it.key(), e.key(), v.size() - 1);
        v[id] = e.value().get<double>();
      }
      out.n_experts = std::max<int64_t>(out.n_experts, int64_t(v.size()));
      dst[layer] = std::move(v);
    }
  }
  return out;
}

}  // namespace moekit
