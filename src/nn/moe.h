// DeepSeekMoE layer: y = shared_experts(x) + sum_{i in topK} g_i * routed_experts[i](x).
// Data flow as named steps (Megatron-Core's layout): route -> permute (group the (token, k)
// pairs by expert, a plan built on the device) -> experts (grouped GEMMs over all experts' row
// blocks at once, one SwiGLU over every row) -> unpermute/combine (weighted scatter-add back to
// tokens). Only permute and combine would ever communicate under expert parallelism.
#pragma once

#include <vector>

#include "model/config.h"
#include "nn/mlp.h"
#include "nn/router.h"

namespace moekit {

// Where each (token, k) pair goes: slots sorted by expert, stable in (token, k) order. The
// tensors live on the routing's device; only the expert offsets come to the host (the grouped
// GEMMs need the sizes).
struct DispatchPlan {
  Tensor slot_token;                  // I32 [T*K]: token of each slot
  Tensor slot_pair;                   // I32 [T*K]: t*K + k of each slot
  Tensor slot_weight;                 // [T*K]: combine weight of each slot
  std::vector<int64_t> expert_begin;  // [E+1] slot offsets per expert (host copy)
};

DispatchPlan make_dispatch_plan(Backend& be, const Routing& r, int64_t n_experts);

struct MoE {
  Router gate;
  // The routed experts' parameters (model.layers.L.mlp.experts.E.{gate,up,down}_proj), one MLP
  // each so checkpoints, ESFT and optimizers see per-expert tensors; the layer runs them grouped
  // (their MLP::forward is not used here).
  std::vector<MLP> routed_experts;
  MLP shared_experts;  // one SwiGLU of width n_shared * moe_intermediate; absent if n_shared = 0
  bool has_shared = false;
  std::vector<int64_t> expert_load;  // tokens per expert in the last forward (balance stats)

  // What backward needs, every [N, .] tensor in slot order (N = T*K rows, expert by expert).
  struct Saved {
    DispatchPlan plan;
    Tensor xs;          // [N, H] permuted input rows
    Tensor gate, up;    // [N, I] gate and up projections
    Tensor h;           // [N, I] silu(gate) * up
    Tensor expert_out;  // [N, H] down projection, before the combine weight
  } saved;

  static MoE create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                    Device device);
  Tensor forward(Backend& be, const Tensor& x);
  void backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate);
};

}  // namespace moekit
