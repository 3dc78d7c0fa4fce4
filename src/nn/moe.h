// DeepSeekMoE layer: y = shared_experts(x) + sum_{i in topK} g_i * routed_experts[i](x).
// Data flow as named steps (Megatron-Core's layout): route -> permute (group the (token, k)
// pairs by expert) -> experts (one GEMM chain per expert over its contiguous rows) ->
// unpermute/combine (weighted scatter-add back to tokens). Only permute and combine would ever
// communicate under expert parallelism.
#pragma once

#include <vector>

#include "model/config.h"
#include "nn/mlp.h"
#include "nn/router.h"

namespace moekit {

// Where each (token, k) pair goes: slots sorted by expert, stable in token order.
struct DispatchPlan {
  Tensor slot_token;                  // I32 [T*K]: token of each slot
  Tensor slot_weight;                 // [T*K]: combine weight of each slot
  std::vector<int32_t> slot_pair;     // t*K + k of each slot (host)
  std::vector<int64_t> expert_begin;  // [E+1] slot offsets per expert (host)
};

DispatchPlan make_dispatch_plan(const Routing& r, int64_t n_experts);

struct MoE {
  Router gate;
  std::vector<MLP> routed_experts;
  MLP shared_experts;  // one SwiGLU of width n_shared * moe_intermediate; absent if n_shared = 0
  bool has_shared = false;
  std::vector<int64_t> expert_load;  // tokens per expert in the last forward (balance stats)

  struct Saved {
    DispatchPlan plan;
    Tensor x, expert_out;  // expert_out [T*K, H] in slot order, before weighting
  } saved;

  static MoE create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                    Device device);
  Tensor forward(Backend& be, const Tensor& x);
  void backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate);
};

}  // namespace moekit
