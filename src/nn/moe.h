// DeepSeekMoE layer: y = shared_experts(x) + sum_{i in topK} g_i * routed_experts[i](x).
// Data flow as named steps (Megatron-Core's layout): route -> permute (group the (token, k)
// pairs by expert, a plan built on the device) -> experts (grouped GEMMs over all experts' row
// blocks at once, SwiGLU over every row: Backend::grouped_swiglu, which a backend may fuse) ->
// unpermute/combine (weighted scatter-add back to tokens). Only permute and combine would ever
// communicate under expert parallelism.
// Few-token fast path (decode): when no backward follows and T*K is small, the experts run as
// GEMVs straight from the device-side routing (Backend::moe_experts_small): no plan, no host copy,
// two launches per layer besides the gate, the shared experts folded into them.
#pragma once

#include <functional>
#include <vector>

#include "model/config.h"
#include "nn/mlp.h"
#include "nn/router.h"

namespace moekit {

// Where each (token, k) pair goes: slots sorted by expert, stable in (token, k) order, each
// expert's block padded with empty slots to the backend's row multiple (expert_row_alignment: 1
// on the CPU, 128 for the CUDA backend's batched expert GEMMs at training sizes). The tensors live
// on the routing's device; only the expert offsets and loads come to the host (the GEMMs need the
// sizes).
struct DispatchPlan {
  Tensor slot_token;                  // I32 [S]: token of each slot (-1: padding)
  Tensor slot_pair;                   // I32 [S]: t*K + k of each slot (-1: padding)
  Tensor slot_weight;                 // [S]: combine weight of each slot (0: padding)
  Tensor token_slots;                 // I32 [T, K]: each token's slots, increasing (the combine)
  std::vector<int64_t> expert_begin;  // [E+1] slot offsets per expert, padding included (host)
  std::vector<int64_t> expert_rows;   // [E] pairs per expert, without padding (host)
};

// `meanwhile` (may be empty) runs after the plan's kernels and its copy to the host are queued and
// before the host waits for that copy: work that does not need the plan.
DispatchPlan make_dispatch_plan(Backend& be, const Routing& r, int64_t n_experts,
                                const std::function<void()>& meanwhile = {});

struct MoE {
  Router gate;
  // The routed experts' parameters (model.layers.L.mlp.experts.E.{gate,up,down}_proj), one MLP
  // each so checkpoints, ESFT and optimizers see per-expert tensors; the layer runs them grouped
  // (their MLP::forward is not used here).
  std::vector<MLP> routed_experts;
  MLP shared_experts;  // one SwiGLU of width n_shared * moe_intermediate; absent if n_shared = 0
  bool has_shared = false;
  // Selective recomputation: forward keeps only the input and the plan, and backward gathers the
  // rows and runs the experts' gate and up GEMMs again (a third of the layer's expert FLOPs) for
  // the two [N, I] tensors it would otherwise hold per layer (DeepSeekModel::set_expert_recompute).
  bool recompute_experts = false;
  // Tokens per expert in the last forward (balance stats, the training report). Empty after a
  // forward on the few-token path, which never brings the routing to the host; what reads it
  // (train/balance.cpp, the trainer) runs training forwards only. Route logging reads
  // gate.saved.routing, which both paths keep.
  std::vector<int64_t> expert_load;

  // The few-token path's limit on T*K (token, expert) pairs. Each pair streams its expert's
  // weights once (no sharing between the tokens of one expert), so its traffic is T*K experts'
  // weights against the grouped path's distinct experts; at decode sizes the pairs are almost all
  // distinct (one token's top-k always is), so the GEMVs read the same bytes and save the host
  // sync and the per-expert launches. As pairs grow, tokens share experts (64 pairs already equal
  // V2-Lite's 64 experts) and GEMMs, which reuse each weight tile across rows, win. 64 also keeps
  // the GEMV passes to at most 64 x I and T x H warps. Not tuned on hardware: measure to move it.
  static constexpr int64_t kSmallMaxPairs = 64;

  // What backward needs. Only the gate and up projections of every slot (N = T*K rows and the
  // plan's padding, expert by expert; padding rows are zeros) and the layer's input: the combine
  // weights' gradient comes from the down projection's backward (swiglu_scaled_backward), which
  // needs neither the experts' outputs nor h, and the permuted input rows and h are rebuilt in
  // backward for the slots of trainable experts only (ESFT trains a few per layer). Keeping
  // xs, h and the outputs cost 2 [N, H] and one [N, I] tensor per layer: with top-6 of 64 experts
  // about 6x the layer's input each, the largest part of a training step's activations.
  // gate and up are F32, or BF16 under Precision::Bf16 where the backend has the bf16 variants
  // of the layer's ops (the CUDA backend; the CPU stays fp32): every expert GEMM rounds them to
  // bf16 then anyway, so bf16 storage keeps the same values in half the memory.
  struct Saved {
    DispatchPlan plan;
    Tensor x;         // [T, H] the input as the expert GEMMs read it (gemm_input)
    Tensor gate, up;  // [N, I] gate and up projections
  } saved;

  static MoE create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                    Device device);
  // y [T,H] from x [T,H]. backward_follows = false (inference: the Generator, evaluation, route
  // logging, a prefill) saves nothing for backward (saved is cleared, and backward refuses to
  // run; the gate and up products are not kept) and lets the layer take the few-token path when
  // T*K <= kSmallMaxPairs and every routed expert's weights share a dtype the backend's
  // moe_experts_small supports. Training keeps the default.
  // With a residual stream r (F32 [T,H]): the layer's output is added into *r (the shared
  // experts' down GEMM with beta 1, then the combine), and *r is returned.
  Tensor forward(Backend& be, const Tensor& x, bool backward_follows = true,
                 Tensor* residual = nullptr);
  // Inference only: y [T,H] += MoE(x), for a residual stream y. On the few-token path the experts
  // add straight into y (no output tensor, no add kernel); past it (or for dtypes that keep the
  // path off), y += forward(x) on the grouped path. Saves nothing for backward (as forward with
  // backward_follows = false).
  void forward_add(Backend& be, const Tensor& x, Tensor& y);
  // Consumes the saved activations (each is released once used; the routing plan stays): one
  // backward per forward. An undefined dx: the caller needs no input gradient (the lowest layer
  // that trains); with the router frozen too, only the trainable experts' slots then run.
  void backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate);
  bool trains() const;
};

}  // namespace moekit
