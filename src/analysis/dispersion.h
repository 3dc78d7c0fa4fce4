// Routing dispersion (ESFT paper, "expert specialisation"): from a task's routing logs, the share
// of routing each expert receives per MoE layer, how many experts cover 50% / 80% of it, and how
// much the concentrated expert sets of two tasks overlap.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "esft/routing_log.h"

namespace moekit {

struct LayerDispersion {
  int layer = 0;
  std::vector<double> share;  // per expert: its token selections / all selections (sums to 1)
  int64_t experts_50 = 0, experts_80 = 0;
};

struct TaskDispersion {
  std::string task;
  std::vector<LayerDispersion> layers;  // by layer number
};

TaskDispersion routing_dispersion(const std::string& task,
                                  const std::map<int, std::vector<SequenceRouting>>& logs,
                                  int64_t n_experts);

// The fewest experts whose shares (largest first, ties to the lower id) reach `mass`.
std::vector<int> experts_covering(const std::vector<double>& share, double mass);

// Mean over common layers of the Jaccard index of the two tasks' `mass`-covering expert sets.
double dispersion_overlap(const TaskDispersion& a, const TaskDispersion& b, double mass);

}  // namespace moekit
