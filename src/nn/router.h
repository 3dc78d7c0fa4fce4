// Router (the MoE "gate"): gating (logits = x W_gate^T, fp32) then routing (scores, top-K with
// optional group limit, weights). The balance_bias (`e_score_correction_bias` in V3 checkpoints,
// Loss-Free Balancing's b_i) shifts selection only and has no gradient.
#pragma once

#include <vector>

#include "model/config.h"
#include "nn/params.h"

namespace moekit {

struct Routing {
  Tensor topk_idx;  // I32 [T, K]
  Tensor topk_w;    // [T, K] combine weights
  Tensor scores;    // [T, E] softmax or sigmoid scores (saved for backward)
};

struct Router {
  GateParams p;
  // Expert-level auxiliary balance loss alpha * sum_i f_i P_i (0 = off; the baseline that
  // Loss-Free Balancing replaces). f_i = E/(K T) count_i, P_i = mean_t s'_{t,i} with s' the
  // softmax scores, or the sigmoid scores normalised over experts.
  float aux_alpha = 0.0f;
  double aux_loss = 0.0;          // value in the last forward
  Param* weight = nullptr;        // [E, hidden]
  Param* balance_bias = nullptr;  // [E] buffer; always present (zeros unless V3 or LFB)
  struct Saved {
    Tensor x;  // the GEMM input: BF16 under Bf16 (nn/linear.h), else F32
    Routing routing;
    Tensor daux_scores;  // [T,E] gradient of the aux loss on the scores (when aux_alpha > 0)
  } saved;

  static Router create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                       Device device);
  Routing forward(Backend& be, const Tensor& x);
  // dx += dL/dx through the gate (none for an undefined dx); weight.grad += when it trains.
  void backward(Backend& be, Tensor& dx, const Tensor& dtopk_w);
  bool trains() const { return has_grad(weight); }

 private:
  void compute_aux_loss(int64_t T);
};

}  // namespace moekit
