// AdamW with decoupled weight decay (Loshchilov & Hutter), state only for trainable parameters:
// a frozen parameter (ESFT's unchosen experts) has no moments at all. Also the global-norm
// gradient clipping every recipe here uses (max_grad_norm 1.0).
#pragma once

#include <map>
#include <string>

#include "nn/params.h"

namespace moekit {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;  // DeepSeek LLM / ESFT
  double eps = 1e-8;
  double weight_decay = 0.1;
};

class AdamW {
 public:
  explicit AdamW(AdamWConfig cfg = {}) : cfg_(cfg) {}

  // One update of every trainable parameter with its gradient; allocates moments on first use.
  // Norm weights and 1-D tensors get no weight decay (common practice, as in DeepSeek's code).
  void step(ParamTable& params, double lr);

  int64_t steps() const { return step_; }
  size_t state_bytes() const;
  // Moments by parameter name ("m." / "v." prefixes) and the step count, for checkpoints.
  std::map<std::string, Tensor> state() const;
  void load_state(const std::map<std::string, Tensor>& state, int64_t step);

 private:
  struct Moments {
    Tensor m, v;
  };
  AdamWConfig cfg_;
  int64_t step_ = 0;
  std::map<std::string, Moments> moments_;
};

// Scales all gradients so their global L2 norm is at most max_norm; returns the norm before.
double clip_grad_norm(ParamTable& params, double max_norm);

}  // namespace moekit
