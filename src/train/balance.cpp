// Load statistics and the Loss-Free Balancing update.
#include "train/balance.h"

#include <algorithm>

#include "core/error.h"
#include "ops/ops.h"

namespace moekit {

Balance parse_balance(const std::string& s) {
  if (s == "lfb") return Balance::LossFree;
  if (s == "aux") return Balance::Aux;
  if (s == "none") return Balance::None;
  fail("--balance: expected lfb, aux or none, got \"{}\"", s);
}

ExpertLoad zero_load(DeepSeekModel& model) {
  ExpertLoad load;
  for (auto& l : model.layers())
    if (l.moe) load.emplace_back(l.moe->routed_experts.size(), 0);
  return load;
}

void accumulate_load(DeepSeekModel& model, ExpertLoad& load) {
  size_t i = 0;
  for (auto& l : model.layers()) {
    if (!l.moe) continue;
    for (size_t e = 0; e < l.moe->expert_load.size(); ++e) load[i][e] += l.moe->expert_load[e];
    ++i;
  }
}

double max_violation(const std::vector<int64_t>& counts) {
  if (counts.empty()) return 0.0;
  int64_t sum = 0, mx = 0;
  for (int64_t c : counts) {
    sum += c;
    mx = std::max(mx, c);
  }
  if (sum == 0) return 0.0;
  double mean = double(sum) / double(counts.size());
  return double(mx) / mean - 1.0;
}

double mean_max_violation(const ExpertLoad& load) {
  if (load.empty()) return 0.0;
  double s = 0.0;
  for (const auto& l : load) s += max_violation(l);
  return s / double(load.size());
}

void loss_free_update(DeepSeekModel& model, const ExpertLoad& load, double rate) {
  size_t i = 0;
  for (auto& l : model.layers()) {
    if (!l.moe) continue;
    const auto& c = load[i++];
    int64_t sum = 0;
    for (int64_t v : c) sum += v;
    const double mean = double(sum) / double(c.size());
    // The signs come from the counts (on the host: the layer reads its per-expert offsets back
    // to size the expert GEMMs); the bias itself is updated where it lives, by the backend's
    // add, so a GPU bias is never copied back.
    Tensor& b = l.moe->gate.balance_bias->value;
    Tensor sign = Tensor::empty({int64_t(c.size())});
    for (size_t e = 0; e < c.size(); ++e) {
      const double err = mean - double(c[e]);
      sign.f32()[e] = float((err > 0) - (err < 0));
    }
    backend(b.device()).add(b, sign.to_device(b.device()), float(rate));
  }
}

}  // namespace moekit
