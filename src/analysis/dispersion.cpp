// Routing dispersion per task and layer, and overlap between tasks.
#include "analysis/dispersion.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace moekit {

std::vector<int> experts_covering(const std::vector<double>& share, double mass) {
  std::vector<int> order(share.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return share[a] > share[b]; });
  std::vector<int> taken;
  double sum = 0;
  for (int e : order) {
    if (sum >= mass - 1e-12) break;
    taken.push_back(e);
    sum += share[size_t(e)];
  }
  return taken;
}

TaskDispersion routing_dispersion(const std::string& task,
                                  const std::map<int, std::vector<SequenceRouting>>& logs,
                                  int64_t n_experts) {
  TaskDispersion d{task, {}};
  for (const auto& [layer, seqs] : logs) {
    LayerDispersion ld;
    ld.layer = layer;
    ld.share.assign(size_t(n_experts), 0.0);
    double total = 0;
    for (const auto& s : seqs)
      for (int32_t e : s.expert_ids) {
        if (e < 0 || e >= n_experts)
          fail("routing log of task {} layer {}: expert {} outside [0, {})", task, layer, e,
               n_experts);
        ld.share[size_t(e)] += 1.0;
        total += 1.0;
      }
    if (total == 0) fail("routing log of task {} layer {}: no tokens", task, layer);
    for (double& v : ld.share) v /= total;
    ld.experts_50 = int64_t(experts_covering(ld.share, 0.5).size());
    ld.experts_80 = int64_t(experts_covering(ld.share, 0.8).size());
    d.layers.push_back(std::move(ld));
  }
  return d;
}

double dispersion_overlap(const TaskDispersion& a, const TaskDispersion& b, double mass) {
  double sum = 0;
  int n = 0;
  for (const auto& la : a.layers)
    for (const auto& lb : b.layers) {
      if (la.layer != lb.layer) continue;
      std::vector<int> sa = experts_covering(la.share, mass), sb = experts_covering(lb.share, mass);
      std::sort(sa.begin(), sa.end());
      std::sort(sb.begin(), sb.end());
      std::vector<int> both, either;
      std::set_intersection(sa.begin(), sa.end(), sb.begin(), sb.end(), std::back_inserter(both));
      std::set_union(sa.begin(), sa.end(), sb.begin(), sb.end(), std::back_inserter(either));
      sum += either.empty() ? 0.0 : double(both.size()) / double(either.size());
      ++n;
    }
  return n ? sum / n : 0.0;
}

}  // namespace moekit
