// Expert selection and the expert config format.
#include "esft/expert_config.h"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>

#include "core/error.h"

namespace moekit {

ExpertConfig select_experts(const std::map<int, std::vector<double>>& scores, double top_p) {
  if (!(top_p > 0.0 && top_p <= 1.0)) fail("--top-p must be in (0, 1], got {}", top_p);
  ExpertConfig cfg;
  for (const auto& entry : scores) {
    const std::vector<double>& s = entry.second;  // (clang 14 cannot capture structured bindings)
    std::vector<int> order(s.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return s[size_t(a)] > s[size_t(b)]; });
    double total = 0.0;
    auto& chosen = cfg.experts[entry.first];
    for (int e : order) {
      if (total >= top_p) break;
      chosen.push_back(e);
      total += s[size_t(e)];
    }
  }
  return cfg;
}

std::string ExpertConfig::to_json_text() const {
  std::vector<int> layers;
  for (const auto& [l, v] : experts) layers.push_back(l);
  std::sort(layers.begin(), layers.end(),
            [](int a, int b) { return std::to_string(a) < std::to_string(b); });
  std::string out = "{\"experts\": {";
  for (size_t i = 0; i < layers.size(); ++i) {
    out += (i ? ", \"" : "\"") + std::to_string(layers[i]) + "\": [";
    const auto& v = experts.at(layers[i]);
    for (size_t k = 0; k < v.size(); ++k) out += (k ? ", " : "") + std::to_string(v[k]);
    out += "]";
  }
  out += std::string("}, \"shared_experts\": ") + (shared_experts ? "true" : "false");
  out += std::string(", \"non_expert_modules\": ") + (non_expert_modules ? "true" : "false") + "}";
  return out;
}

ExpertConfig read_expert_config(const std::filesystem::path& file) {
  const std::string f = file.string();
  std::ifstream in(file);
  if (!in) fail("{}: cannot read file", f);
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("{}: not a JSON object", f);
  if (!j.contains("experts") || !j["experts"].is_object())
    fail("{}: field \"experts\" is missing or not an object", f);
  ExpertConfig cfg;
  for (const char* flag : {"shared_experts", "non_expert_modules"}) {
    if (j.contains(flag) && !j[flag].is_boolean())
      fail("{}: field \"{}\" must be true or false", f, flag);
    bool v = j.value(flag, false);
    (std::string(flag) == "shared_experts" ? cfg.shared_experts : cfg.non_expert_modules) = v;
  }
  for (auto it = j["experts"].begin(); it != j["experts"].end(); ++it) {
    int layer = -1;
    auto r = std::from_chars(it.key().data(), it.key().data() + it.key().size(), layer);
    if (r.ec != std::errc() || r.ptr != it.key().data() + it.key().size() || layer < 0)
      fail("{}: experts[\"{}\"]: the key must be a layer number", f, it.key());
    if (!it.value().is_array())
      fail("{}: experts[\"{}\"]: expected a list of expert ids", f, it.key());
    auto& v = cfg.experts[layer];
    for (const auto& e : it.value()) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0)
        fail("{}: experts[\"{}\"]: {} is not an expert id", f, it.key(), e.dump());
      v.push_back(e.get<int>());
    }
  }
  return cfg;
}

}  // namespace moekit
