// MoE forward/backward: route, permute, grouped experts, combine.
#include "nn/moe.h"

#include <fmt/format.h>

#include "core/error.h"
#include "core/profile.h"
#include "nn/linear.h"

namespace moekit {

DispatchPlan make_dispatch_plan(Backend& be, const Routing& r, int64_t n_experts) {
  const int64_t N = r.topk_idx.numel();
  const int64_t align = be.expert_row_alignment(N, n_experts);
  const int64_t S = dispatch_slots(N, n_experts, align);
  const Device dev = r.topk_idx.device();
  DispatchPlan plan;
  plan.slot_token = Tensor::empty({S}, DType::I32, dev);
  plan.slot_pair = Tensor::empty({S}, DType::I32, dev);
  plan.slot_weight = Tensor::empty({S}, DType::F32, dev);
  Tensor offsets = Tensor::empty({2 * n_experts + 1}, DType::I32, dev);  // begins, then loads
  Tensor begin = offsets.slice(0, n_experts + 1),
         rows = offsets.slice(n_experts + 1, 2 * n_experts + 1);
  be.moe_dispatch_plan(plan.slot_token, plan.slot_pair, plan.slot_weight, begin, rows, r.topk_idx,
                       r.topk_w, n_experts, align);
  Tensor host = offsets.to_host();  // the layer's one small device-to-host copy
  plan.expert_begin.assign(host.i32(), host.i32() + n_experts + 1);
  plan.expert_rows.assign(host.i32() + n_experts + 1, host.i32() + 2 * n_experts + 1);
  // The slots past the last expert's block are padding no expert reads: drop them.
  const int64_t used = plan.expert_begin.back();
  plan.slot_token = plan.slot_token.slice(0, used);
  plan.slot_pair = plan.slot_pair.slice(0, used);
  plan.slot_weight = plan.slot_weight.slice(0, used);
  return plan;
}

MoE MoE::create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                Device device) {
  MoE m;
  m.gate = Router::create(params, prefix + ".gate", c, device);
  for (int64_t e = 0; e < c.n_routed_experts; ++e)
    m.routed_experts.push_back(MLP::create(params, fmt::format("{}.experts.{}", prefix, e),
                                           c.hidden_size, c.moe_intermediate_size, device));
  m.has_shared = c.n_shared_experts > 0;
  if (m.has_shared)
    m.shared_experts = MLP::create(params, prefix + ".shared_experts", c.hidden_size,
                                   c.n_shared_experts * c.moe_intermediate_size, device);
  return m;
}

namespace {

// The value tensors of one projection of every routed expert (grouped GEMM operands).
std::vector<const Tensor*> weights(const std::vector<MLP>& experts, Param* MLP::*proj) {
  std::vector<const Tensor*> w;
  w.reserve(experts.size());
  for (const MLP& e : experts) w.push_back(&(e.*proj)->value);
  return w;
}

// W.grad += dy_e^T @ x_e for every expert whose W trains, in one backend call (batched where the
// backend can). Frozen experts pass no gradient: no GEMM, and ESFT keeps them bit-identical.
void expert_weight_grads(Backend& be, std::vector<MLP>& experts, Param* MLP::*proj,
                         const Tensor& dy, const Tensor& x, const std::vector<int64_t>& begin) {
  std::vector<Tensor*> dw;
  dw.reserve(experts.size());
  for (MLP& e : experts) {
    Param& w = *(e.*proj);
    dw.push_back(w.grad.defined() ? &w.grad : nullptr);
  }
  be.grouped_weight_grad(dw, dy, x, begin);
}

// The routed experts' weights for moe_experts_small, or empty when the backend cannot run them
// there: they must all share one dtype (frozen bf16 experts next to fp32 trainable ones take the
// grouped path) that the backend supports for the op.
std::vector<ExpertWeights> small_path_weights(Backend& be, const std::vector<MLP>& experts) {
  std::vector<ExpertWeights> w;
  if (experts.empty()) return w;
  const DType dtype = experts[0].gate_proj->value.dtype();
  if (!be.supports(Op::MoeExpertsSmall, dtype)) return w;
  w.reserve(experts.size());
  for (const MLP& e : experts) {
    for (const Param* p : {e.gate_proj, e.up_proj, e.down_proj})
      if (p->value.dtype() != dtype) return {};
    w.push_back({&e.gate_proj->value, &e.up_proj->value, &e.down_proj->value});
  }
  return w;
}

// Whether the routed experts keep their activations in bf16: under Precision::Bf16 every expert
// GEMM rounds its F32 operands to bf16 anyway and cuBLAS's grouped GEMM writes bf16 products, so
// storing xs, gate, up, h and expert_out (and backward's dys, dh, dgate, dup) as BF16 gives the
// same values in half the bytes, with no conversion pass before each GEMM and no bf16 -> fp32
// pass after it. Only where the backend has every BF16 variant the layer uses (not the CPU, which
// stays exact fp32).
bool bf16_activations(Backend& be) {
  if (be.precision() != Precision::Bf16) return false;
  for (Op op :
       {Op::GatherRows, Op::GroupedMatmul, Op::SwiGLU, Op::Matmul, Op::ScatterAddRows, Op::RowDot})
    if (!be.supports(op, DType::BF16)) return false;
  return true;
}

// The few-token path (Backend::moe_experts_small) from the routing r: y = MoE(x), allocated here,
// or y += MoE(x) when accumulate. False, with nothing done, when the routed experts' dtypes keep
// the op off (small_path_weights). The shared experts ride along in the op's two kernels when their
// weights have the routed experts' dtype (a decode step then spends no launch on them); else (a
// trainable fp32 shared expert next to frozen bf16 routed ones) they run first, on their own.
bool small_path(Backend& be, MoE& m, const Tensor& x, const Routing& r, Tensor& y, bool accumulate,
                ProfileSteps& prof) {
  const std::vector<ExpertWeights> w = small_path_weights(be, m.routed_experts);
  if (w.empty()) return false;
  prof.next("moe.fwd.small");
  m.saved = {};
  m.expert_load.clear();
  const DType dtype = w[0].gate_proj->dtype();
  const MLP& s = m.shared_experts;
  const bool fold = m.has_shared && s.gate_proj->value.dtype() == dtype &&
                    s.up_proj->value.dtype() == dtype && s.down_proj->value.dtype() == dtype;
  const ExpertWeights shared{fold ? &s.gate_proj->value : nullptr,
                             fold ? &s.up_proj->value : nullptr,
                             fold ? &s.down_proj->value : nullptr};
  if (m.has_shared && !fold) {
    if (accumulate)
      m.shared_experts.forward_add(be, x, y);
    else
      y = m.shared_experts.forward(be, x);
    accumulate = true;
  } else if (!accumulate) {
    y = Tensor::empty({x.dim(0), x.dim(1)}, DType::F32, x.device());
  }
  be.moe_experts_small(y, x, r.topk_idx, r.topk_w, w, accumulate, fold ? &shared : nullptr);
  return true;
}

// The grouped path from the routing r: permute, grouped GEMMs, combine; saves what backward needs.
// xg: x as the GEMMs read it (gemm_input: under Bf16 rounded once, for the router and the shared
// experts; the routed experts gather from the F32 x).
Tensor grouped_path(Backend& be, MoE& m, const Tensor& x, const Tensor& xg, const Routing& r,
                    ProfileSteps& prof) {
  const int64_t T = x.dim(0), H = x.dim(1), E = int64_t(m.routed_experts.size());
  const int64_t I = E > 0 ? m.routed_experts[0].intermediate() : 0;
  const Device dev = x.device();
  MoE::Saved& saved = m.saved;
  prof.next("moe.fwd.plan");
  saved.plan = make_dispatch_plan(be, r, E);  // permute: plan
  const std::vector<int64_t>& begin = saved.plan.expert_begin;
  const int64_t N = begin.back();
  m.expert_load = saved.plan.expert_rows;

  // The routed experts' activations: F32, or BF16 under the Bf16 precision (bf16_activations).
  const DType act = bf16_activations(be) ? DType::BF16 : DType::F32;
  prof.next("moe.fwd.gather");
  saved.xs = Tensor::empty({N, H}, act, dev);
  be.gather_rows(saved.xs, x, saved.plan.slot_token, nullptr);  // permute: move rows
  prof.next("moe.fwd.gate_up");                                 // experts
  saved.gate = Tensor::empty({N, I}, act, dev);
  saved.up = Tensor::empty({N, I}, act, dev);
  be.grouped_matmul(saved.gate, saved.xs, weights(m.routed_experts, &MLP::gate_proj), begin, true,
                    0.0f);
  be.grouped_matmul(saved.up, saved.xs, weights(m.routed_experts, &MLP::up_proj), begin, true,
                    0.0f);
  prof.next("moe.fwd.swiglu");
  saved.h = Tensor::empty({N, I}, act, dev);
  be.swiglu_forward(saved.h, saved.gate, saved.up);
  prof.next("moe.fwd.down");
  saved.expert_out = Tensor::empty({N, H}, act, dev);
  be.grouped_matmul(saved.expert_out, saved.h, weights(m.routed_experts, &MLP::down_proj), begin,
                    true, 0.0f);

  prof.next("moe.fwd.shared");
  // The shared experts read x through GEMMs only: the copy rounded once for them and the router.
  Tensor y =
      m.has_shared ? m.shared_experts.forward(be, xg) : Tensor::zeros({T, H}, DType::F32, dev);
  prof.next("moe.fwd.combine");
  be.scatter_add_rows(y, saved.expert_out, saved.plan.slot_token,
                      &saved.plan.slot_weight);  // combine (fp32 sums)
  return y;
}

}  // namespace

Tensor MoE::forward(Backend& be, const Tensor& x, bool backward_follows) {
  ProfileSteps prof(be);
  prof.next("moe.fwd.route");
  // The router and the shared experts read x through GEMMs only: under Bf16 it is rounded once for
  // both (nn/linear.h; a few-token x stays F32).
  const Tensor xg = gemm_input(be, x);
  Routing r = gate.forward(be, xg);  // route
  Tensor y;
  if (!backward_follows && x.dim(0) * gate.p.top_k <= kSmallMaxPairs &&
      small_path(be, *this, x, r, y, /*accumulate=*/false, prof))
    return y;
  return grouped_path(be, *this, x, xg, r, prof);
}

void MoE::forward_add(Backend& be, const Tensor& x, Tensor& y) {
  MOEKIT_CHECK(y.shape() == x.shape() && y.dtype() == DType::F32,
               "MoE forward_add: y {} ({}) for x {}", y.shape().str(), dtype_name(y.dtype()),
               x.shape().str());
  ProfileSteps prof(be);
  prof.next("moe.fwd.route");
  const Tensor xg = gemm_input(be, x);
  Routing r = gate.forward(be, xg);  // route
  if (x.dim(0) * gate.p.top_k <= kSmallMaxPairs &&
      small_path(be, *this, x, r, y, /*accumulate=*/true, prof))
    return;
  const Tensor out = grouped_path(be, *this, x, xg, r, prof);
  saved = {};  // inference only: nothing kept for a backward (which now refuses to run)
  prof.next("moe.fwd.add");
  be.add(y, out, 1.0f);
}

void MoE::backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate) {
  const int64_t T = dy.dim(0), H = dy.dim(1);
  const int64_t K = gate.p.top_k, I = saved.h.dim(1);
  const Device dev = dy.device();
  const DispatchPlan& plan = saved.plan;
  const std::vector<int64_t>& begin = plan.expert_begin;
  MOEKIT_CHECK(!begin.empty(),
               "MoE backward: the forward before it saved nothing (it was told "
               "no backward follows)");
  const int64_t N = begin.back();
  // Activation gradients in the forward's activation dtype. Under bf16 activations: dys, dh, dgate
  // and dup are BF16, since each feeds only bf16 GEMMs (which would round an F32 copy to the same
  // values: half the bytes, no conversion pass per GEMM) or SwiGLU's backward (dh: the grouped
  // GEMM's bf16 products written as they are, not widened into an F32 copy first). dxs, the sum of
  // the gate and up products, stays F32 (the products are rounded, their sum is not), and so do dx
  // and the weight gradients (fp32 accumulation).
  const DType act = saved.xs.dtype();

  // Combine weights: dL/dw of slot s = dy[token(s)] . expert_out[s], scattered back to [T, K]
  // order by slot_pair (a permutation: every pair receives exactly one slot).
  ProfileSteps prof(be);
  prof.next("moe.bwd.combine");
  Tensor dw_slot = Tensor::empty({N}, DType::F32, dev);
  be.row_dot(dw_slot, dy, plan.slot_token, saved.expert_out);
  saved.expert_out = Tensor();
  Tensor dtopk = Tensor::zeros({T, K}, DType::F32, dev);
  Tensor dtopk_rows = dtopk.reshape({T * K, 1});
  be.scatter_add_rows(dtopk_rows, dw_slot.reshape({N, 1}), plan.slot_pair, nullptr);

  // Unpermute's backward is a weighted gather; then the experts' chain backwards, grouped. Each
  // intermediate, and each saved activation, is dropped once its last reader is queued (the next
  // allocation may reuse it): backward consumes what the forward saved, which lowers the peak
  // of a training step (it falls in a MoE layer's backward).
  prof.next("moe.bwd.gather");
  Tensor dys = Tensor::empty({N, H}, act, dev);
  be.gather_rows(dys, dy, plan.slot_token, &plan.slot_weight);
  prof.next("moe.bwd.down");
  Tensor dh = Tensor::empty({N, I}, act, dev);
  be.grouped_matmul(dh, dys, weights(routed_experts, &MLP::down_proj), begin, false, 0.0f);
  prof.next("moe.bwd.down_wgrad");
  expert_weight_grads(be, routed_experts, &MLP::down_proj, dys, saved.h, begin);
  dys = Tensor();
  saved.h = Tensor();
  prof.next("moe.bwd.swiglu");
  Tensor dgate = Tensor::empty({N, I}, act, dev), dup = Tensor::empty({N, I}, act, dev);
  be.swiglu_backward(dgate, dup, dh, saved.gate, saved.up);
  dh = Tensor();
  saved.gate = Tensor();
  saved.up = Tensor();
  // dxs = dgate @ W_gate + dup @ W_up over the same groups: one call (one launch where the
  // backend can, and one pass writing dxs instead of two).
  prof.next("moe.bwd.gate_up");
  Tensor dxs = Tensor::empty({N, H}, DType::F32, dev);
  const std::vector<const Tensor*> w_gate = weights(routed_experts, &MLP::gate_proj),
                                   w_up = weights(routed_experts, &MLP::up_proj);
  const GroupedTerm terms[] = {{&dgate, w_gate}, {&dup, w_up}};
  be.grouped_matmul_sum(dxs, terms, begin, false, 0.0f);
  prof.next("moe.bwd.gate_up_wgrad");
  expert_weight_grads(be, routed_experts, &MLP::gate_proj, dgate, saved.xs, begin);
  expert_weight_grads(be, routed_experts, &MLP::up_proj, dup, saved.xs, begin);
  dgate = Tensor();
  dup = Tensor();
  saved.xs = Tensor();

  prof.next("moe.bwd.shared");
  if (has_shared) {
    shared_experts.backward(be, dx, dy, accumulate);
  } else if (!accumulate) {
    be.fill(dx, 0.0f);
  }
  prof.next("moe.bwd.scatter");
  be.scatter_add_rows(dx, dxs, plan.slot_token, nullptr);
  prof.next("moe.bwd.route");
  gate.backward(be, dx, dtopk);
}

}  // namespace moekit
