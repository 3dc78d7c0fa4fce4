// Expert load balance: Loss-Free Balancing's bias update and the MaxVio metric
// (methods.md: b_i += u * sign(mean(c) - c_i); MaxVio = max_i c_i / mean(c) - 1).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/deepseek.h"

namespace moekit {

enum class Balance { LossFree, Aux, None };
Balance parse_balance(const std::string& s);  // "lfb" | "aux" | "none"

// Per MoE layer, tokens per expert.
using ExpertLoad = std::vector<std::vector<int64_t>>;

ExpertLoad zero_load(DeepSeekModel& model);
// Adds the counts of the model's last forward.
void accumulate_load(DeepSeekModel& model, ExpertLoad& load);
// max_i c_i / mean(c) - 1 for one layer; 0 for an idle layer.
double max_violation(const std::vector<int64_t>& counts);
// MaxVio averaged over MoE layers.
double mean_max_violation(const ExpertLoad& load);
// One Loss-Free Balancing update of every MoE layer's balance_bias from the step's load.
void loss_free_update(DeepSeekModel& model, const ExpertLoad& load, double rate);

}  // namespace moekit
