// MoE forward/backward: route, permute, grouped experts, combine.
#include "nn/moe.h"

#include <fmt/format.h>

#include "core/error.h"
#include "core/profile.h"
#include "nn/linear.h"

namespace moekit {

DispatchPlan make_dispatch_plan(Backend& be, const Routing& r, int64_t n_experts,
                                const std::function<void()>& meanwhile) {
  const int64_t N = r.topk_idx.numel();
  const int64_t align = be.expert_row_alignment(N, n_experts);
  const int64_t S = dispatch_slots(N, n_experts, align);
  const Device dev = r.topk_idx.device();
  DispatchPlan plan;
  plan.slot_token = Tensor::empty({S}, DType::I32, dev);
  plan.slot_pair = Tensor::empty({S}, DType::I32, dev);
  plan.slot_weight = Tensor::empty({S}, DType::F32, dev);
  plan.token_slots = Tensor::empty(r.topk_idx.shape(), DType::I32, dev);
  Tensor offsets = Tensor::empty({2 * n_experts + 1}, DType::I32, dev);  // begins, then loads
  Tensor begin = offsets.slice(0, n_experts + 1),
         rows = offsets.slice(n_experts + 1, 2 * n_experts + 1);
  be.moe_dispatch_plan(plan.slot_token, plan.slot_pair, plan.slot_weight, plan.token_slots, begin,
                       rows, r.topk_idx, r.topk_w, n_experts, align);
  // The layer's one small device-to-host copy; `meanwhile` queues more work before the host
  // waits for it.
  std::unique_ptr<PendingHostCopy> copy = be.copy_to_host_async(offsets);
  if (meanwhile) meanwhile();
  const Tensor host = copy->wait();
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

// One projection of every routed expert as a grouped GEMM of `rows` rows reads it (gemm_weight:
// the bf16 copy of a trainable master where that GEMM rounds it anyway).
std::vector<const Tensor*> weights(Backend& be, const std::vector<MLP>& experts, Param* MLP::*proj,
                                   int64_t rows) {
  std::vector<const Tensor*> w;
  w.reserve(experts.size());
  for (const MLP& e : experts) w.push_back(&gemm_weight(be, *(e.*proj), rows));
  return w;
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
  for (Op op : {Op::GatherRows, Op::GroupedMatmul, Op::SwiGLU, Op::Matmul, Op::ScatterAddRows})
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

// The experts' gate and up projections of every slot into m.saved (act: their dtype): the
// layer's saved input rows gathered in plan order (permute), then one grouped GEMM per projection.
// Backward runs it under recompute_experts (the forward forms the products inside
// grouped_swiglu, and keeps them unless recompute_experts).
void expert_gate_up(Backend& be, MoE& m, DType act) {
  MoE::Saved& saved = m.saved;
  const std::vector<int64_t>& begin = saved.plan.expert_begin;
  const int64_t N = begin.back(), H = saved.x.dim(1);
  const int64_t I = m.routed_experts.empty() ? 0 : m.routed_experts[0].intermediate();
  const Device dev = saved.x.device();
  Tensor xs = Tensor::empty({N, H}, act, dev);
  be.gather_rows(xs, saved.x, saved.plan.slot_token, nullptr);
  saved.gate = Tensor::empty({N, I}, act, dev);
  saved.up = Tensor::empty({N, I}, act, dev);
  be.grouped_matmul(saved.gate, xs, weights(be, m.routed_experts, &MLP::gate_proj, N), begin, true,
                    0.0f);
  be.grouped_matmul(saved.up, xs, weights(be, m.routed_experts, &MLP::up_proj, N), begin, true,
                    0.0f);
}

// The grouped path from the routing r: permute, grouped GEMMs, combine; saves what backward needs
// when one follows (else saves nothing: the gate and up products are not even written where the
// backend fuses SwiGLU into their GEMM). xg: x as the GEMMs read it (gemm_input: under Bf16
// rounded once, for the router, the shared experts and the routed experts' gather, which then
// reads half the bytes for the same values). With a residual stream: the output is added into it
// (the shared experts' down GEMM with beta 1, then the combine), and it is returned.
Tensor grouped_path(Backend& be, MoE& m, const Tensor& xg, const Routing& r, bool backward_follows,
                    ProfileSteps& prof, Tensor* residual = nullptr) {
  const int64_t T = xg.dim(0), H = xg.dim(1), E = int64_t(m.routed_experts.size());
  const int64_t I = E > 0 ? m.routed_experts[0].intermediate() : 0;
  const Device dev = xg.device();
  MoE::Saved& saved = m.saved;
  prof.next("moe.fwd.plan");
  // The shared experts do not need the plan: queued while its sizes come to the host, they keep
  // the device busy through that wait.
  Tensor y;
  saved.plan = make_dispatch_plan(be, r, E, [&] {  // permute: plan
    prof.next("moe.fwd.shared");
    if (m.has_shared)
      y = m.shared_experts.forward(be, xg, residual);
    else
      y = residual ? *residual : Tensor::zeros({T, H}, DType::F32, dev);
    prof.next("moe.fwd.plan");
  });
  saved.x = xg;
  const std::vector<int64_t>& begin = saved.plan.expert_begin;
  const int64_t N = begin.back();
  m.expert_load = saved.plan.expert_rows;

  // The routed experts' activations: F32, or BF16 under the Bf16 precision (bf16_activations).
  const DType act = bf16_activations(be) ? DType::BF16 : DType::F32;
  prof.next("moe.fwd.gate_up");  // permute (move rows), experts (SwiGLU included)
  Tensor xs = Tensor::empty({N, H}, act, dev);
  be.gather_rows(xs, xg, saved.plan.slot_token, nullptr);
  const bool keep = backward_follows && !m.recompute_experts;  // backward reads gate and up
  saved.gate = keep ? Tensor::empty({N, I}, act, dev) : Tensor();
  saved.up = keep ? Tensor::empty({N, I}, act, dev) : Tensor();
  Tensor h = Tensor::empty({N, I}, act, dev);
  be.grouped_swiglu(h, keep ? &saved.gate : nullptr, keep ? &saved.up : nullptr, xs,
                    weights(be, m.routed_experts, &MLP::gate_proj, N),
                    weights(be, m.routed_experts, &MLP::up_proj, N), begin);
  xs = Tensor();
  prof.next("moe.fwd.down");
  Tensor expert_out = Tensor::empty({N, H}, act, dev);
  be.grouped_matmul(expert_out, h, weights(be, m.routed_experts, &MLP::down_proj, N), begin, true,
                    0.0f);
  h = Tensor();

  prof.next("moe.fwd.combine");
  be.combine_slots(y, expert_out, saved.plan.slot_token, saved.plan.token_slots,
                   &saved.plan.slot_weight);  // combine (fp32 sums)
  return y;
}

// The slot rows of the routed experts whose weights train, as consecutive blocks: `experts` in
// order, expert experts[i] at rows [begin[i], begin[i+1]) of the compacted tensors. When every
// expert with slots trains (full fine-tuning), the plan's own layout is used (whole = true: no
// compaction, begin is the plan's).
struct TrainableRows {
  std::vector<size_t> experts;
  std::vector<int64_t> begin{0};
  bool whole = false;
};

TrainableRows trainable_rows(const std::vector<MLP>& experts, const DispatchPlan& plan) {
  TrainableRows t;
  const std::vector<int64_t>& b = plan.expert_begin;
  bool all = true;
  for (size_t e = 0; e < experts.size(); ++e) {
    const MLP& x = experts[e];
    const bool trains =
        x.gate_proj->grad.defined() || x.up_proj->grad.defined() || x.down_proj->grad.defined();
    if (b[e + 1] == b[e]) continue;
    all = all && trains;
    if (!trains) continue;
    t.experts.push_back(e);
    t.begin.push_back(t.begin.back() + b[e + 1] - b[e]);
  }
  t.whole = all && !t.experts.empty();
  if (t.whole) t.begin = b;
  return t;
}

// The plan's slot of every compacted row of t (I32 [t.begin.back()] on dev): the one gather
// index that compacts each slot-order tensor of a backward (compact_rows), so compaction costs a
// gather per tensor instead of a copy per tensor and trainable expert (six tensors, ~7 of 64
// experts in ESFT: ~42 copies, ~0.6 ms per layer on an H200). Built on the host, where the
// blocks' offsets are, and uploaded in one small copy (it waits for the queued work: a short gap
// on the GPU, once per layer). The slot tokens and weights are then gathered through it on the
// device like the activations: the plan keeps no host copy of them, and bringing one over would
// take a second synchronising copy for what one small kernel does.
Tensor compaction_index(const TrainableRows& t, const std::vector<int64_t>& plan_begin,
                        Device dev) {
  Tensor index = Tensor::empty({t.begin.back()}, DType::I32);
  int32_t* slot = index.i32();
  for (size_t i = 0; i < t.experts.size(); ++i) {
    const int64_t shift = plan_begin[t.experts[i]] - t.begin[i];
    for (int64_t r = t.begin[i]; r < t.begin[i + 1]; ++r) slot[r] = int32_t(r + shift);
  }
  return index.to_device(dev);
}

// The rows of `full` (slot order; F32, BF16 or I32; 1-D or 2-D) that belong to the trainable
// experts, compacted by one gather through `index` (compaction_index), in the blocks' order.
// The values stay exactly as they were, so the gradients are those of per-expert copies: an
// unweighted gather copies I32 rows and (on the CPU) F32 ones; on the GPU it multiplies F32 by 1
// (exact: the build flushes no denormals) and widens and re-rounds BF16 (exact); a NaN stays a
// NaN. `full` itself when the layout is whole (index then undefined).
Tensor compact_rows(Backend& be, const Tensor& full, const Tensor& index, const TrainableRows& t) {
  if (t.whole) return full;
  Shape shape = full.shape();
  shape.d[0] = t.begin.back();
  Tensor out = Tensor::empty(shape, full.dtype(), full.device());
  const int64_t C = full.ndim() == 1 ? 1 : full.dim(1);  // gather_rows reads rows of [S, C]
  Tensor rows = out.reshape({shape.d[0], C});
  be.gather_rows(rows, full.reshape({full.dim(0), C}), index, nullptr);
  return out;
}

// W.grad += dy_e^T @ x_e for every listed expert whose W trains, in one backend call (batched
// where the backend can), over the blocks of t. Frozen experts pass no gradient: no GEMM, and
// ESFT keeps them bit-identical.
void expert_weight_grads(Backend& be, std::vector<MLP>& experts, const TrainableRows& t,
                         Param* MLP::*proj, const Tensor& dy, const Tensor& x) {
  std::vector<Tensor*> dw(t.whole ? experts.size() : t.experts.size(), nullptr);
  for (size_t i = 0; i < t.experts.size(); ++i) {
    Param& w = *(experts[t.experts[i]].*proj);
    dw[t.whole ? t.experts[i] : i] = w.grad.defined() ? &w.grad : nullptr;
  }
  be.grouped_weight_grad(dw, dy, x, t.begin);
}

bool any_grad(const std::vector<MLP>& experts, const TrainableRows& t, Param* MLP::*proj) {
  for (size_t e : t.experts)
    if ((experts[e].*proj)->grad.defined()) return true;
  return false;
}

// The trainable experts' slots, compacted (trainable_rows, compaction_index): their layout, the
// gather index (undefined when whole) and each compacted row's token.
struct Compaction {
  TrainableRows t;
  Tensor index, slots;
};

Compaction compaction(Backend& be, const MoE& m, Device dev) {
  Compaction c;
  const DispatchPlan& plan = m.saved.plan;
  c.t = trainable_rows(m.routed_experts, plan);
  if (c.t.experts.empty()) return c;
  c.index = c.t.whole ? Tensor() : compaction_index(c.t, plan.expert_begin, dev);
  c.slots = compact_rows(be, plan.slot_token, c.index, c.t);
  return c;
}

// One projection's weights for the compacted blocks of t (all experts' when whole).
std::vector<const Tensor*> weights(Backend& be, const std::vector<MLP>& experts,
                                   const TrainableRows& t, Param* MLP::*proj) {
  const int64_t rows = t.begin.back();
  if (t.whole) return weights(be, experts, proj, rows);
  std::vector<const Tensor*> w;
  for (size_t e : t.experts) w.push_back(&gemm_weight(be, *(experts[e].*proj), rows));
  return w;
}

// The saved gate and up projections and their gradients, of the compacted slots only.
struct CompactedSwiGLU {
  Tensor gate, up, dgate, dup;
};

// The trainable experts' weight gradients from the compacted slots' (c) projections, with what
// the forward did not keep rebuilt for those slots only: the permuted input rows (gathered again
// from the saved input), h (from gate and up), and dy weighted by each slot's combine weight
// (W_down's gradient is the sum of (w dy)^T h over the expert's slots).
void trainable_expert_grads(Backend& be, MoE& m, const Tensor& dy, const Compaction& c,
                            const CompactedSwiGLU& s) {
  const DispatchPlan& plan = m.saved.plan;
  const TrainableRows& t = c.t;
  if (t.experts.empty()) return;
  const int64_t N = t.begin.back(), H = dy.dim(1), I = m.saved.gate.dim(1);
  const DType act = m.saved.gate.dtype();
  const Device dev = dy.device();
  if (any_grad(m.routed_experts, t, &MLP::down_proj)) {
    Tensor dys = Tensor::empty({N, H}, act, dev), h = Tensor::empty({N, I}, act, dev);
    const Tensor slot_weights = compact_rows(be, plan.slot_weight, c.index, t);
    be.gather_rows(dys, dy, c.slots, &slot_weights);
    be.swiglu_forward(h, s.gate, s.up);
    expert_weight_grads(be, m.routed_experts, t, &MLP::down_proj, dys, h);
  }
  if (any_grad(m.routed_experts, t, &MLP::gate_proj) ||
      any_grad(m.routed_experts, t, &MLP::up_proj)) {
    Tensor xs = Tensor::empty({N, H}, act, dev);
    be.gather_rows(xs, m.saved.x, c.slots, nullptr);
    expert_weight_grads(be, m.routed_experts, t, &MLP::gate_proj, s.dgate, xs);
    expert_weight_grads(be, m.routed_experts, t, &MLP::up_proj, s.dup, xs);
  }
}

// The backward of a layer whose input gradient nobody needs and whose router is frozen (in ESFT,
// the lowest layer that trains): no combine-weight gradient, so the frozen experts' slots need
// nothing at all, and the shared experts only their own weight gradients. The down projection's
// backward and SwiGLU's run for the trainable experts' compacted slots alone (~7 of 64 experts in
// ESFT), by the same ops on the same rows as the full backward, which then drops the rest.
void trainable_experts_backward(Backend& be, MoE& m, const Tensor& dy) {
  ProfileSteps prof(be);
  prof.next("moe.bwd.trainable");
  const Device dev = dy.device();
  const Compaction c = compaction(be, m, dev);
  if (!c.t.experts.empty()) {
    const int64_t N = c.t.begin.back(), H = dy.dim(1), I = m.saved.gate.dim(1);
    const DType act = m.saved.gate.dtype();
    Tensor dys = Tensor::empty({N, H}, act, dev);
    be.gather_rows(dys, dy, c.slots, nullptr);
    Tensor dout = Tensor::empty({N, I}, act, dev);
    be.grouped_matmul(dout, dys, weights(be, m.routed_experts, c.t, &MLP::down_proj), c.t.begin,
                      false, 0.0f);
    dys = Tensor();
    CompactedSwiGLU s{compact_rows(be, m.saved.gate, c.index, c.t),
                      compact_rows(be, m.saved.up, c.index, c.t), Tensor::empty({N, I}, act, dev),
                      Tensor::empty({N, I}, act, dev)};
    Tensor dw_slot = Tensor::empty({N}, DType::F32, dev);  // the router's, which is frozen
    be.swiglu_scaled_backward(s.dgate, s.dup, dw_slot, dout, s.gate, s.up,
                              compact_rows(be, m.saved.plan.slot_weight, c.index, c.t));
    dout = Tensor();
    trainable_expert_grads(be, m, dy, c, s);
  }
  m.saved.gate = Tensor();
  m.saved.up = Tensor();
  m.saved.x = Tensor();
  prof.next("moe.bwd.shared");
  Tensor no_dx;
  if (m.has_shared) m.shared_experts.backward(be, no_dx, dy, false);
}

}  // namespace

Tensor MoE::forward(Backend& be, const Tensor& x, bool backward_follows, Tensor* residual) {
  ProfileSteps prof(be);
  prof.next("moe.fwd.route");
  // The router and the shared experts read x through GEMMs only: under Bf16 it is rounded once for
  // both (nn/linear.h; a few-token x stays F32).
  const Tensor xg = gemm_input(be, x);
  Routing r = gate.forward(be, xg);  // route
  Tensor y = residual ? *residual : Tensor();
  if (!backward_follows && x.dim(0) * gate.p.top_k <= kSmallMaxPairs &&
      small_path(be, *this, x, r, y, /*accumulate=*/residual != nullptr, prof))
    return y;
  y = grouped_path(be, *this, xg, r, backward_follows, prof, residual);
  if (!backward_follows) saved = {};  // backward refuses to run (nothing kept for it)
  return y;
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
  (void)grouped_path(be, *this, xg, r, /*backward_follows=*/false, prof, &y);
  saved = {};  // inference only: nothing kept for a backward (which now refuses to run)
}

void MoE::backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate) {
  const int64_t T = dy.dim(0), H = dy.dim(1);
  const int64_t K = gate.p.top_k, I = routed_experts.empty() ? 0 : routed_experts[0].intermediate();
  const Device dev = dy.device();
  const DispatchPlan& plan = saved.plan;
  const std::vector<int64_t>& begin = plan.expert_begin;
  MOEKIT_CHECK(!begin.empty(),
               "MoE backward: the forward before it saved nothing (it was told "
               "no backward follows)");
  const int64_t N = begin.back();
  ProfileSteps prof(be);
  if (!saved.gate.defined()) {  // recompute_experts: what forward dropped
    prof.next("moe.bwd.recompute");
    expert_gate_up(be, *this, bf16_activations(be) ? DType::BF16 : DType::F32);
  }
  if (!dx.defined() && !gate.trains()) return trainable_experts_backward(be, *this, dy);
  // Activation gradients in the forward's activation dtype. Under bf16 activations: dys, dout,
  // dgate and dup are BF16, since each feeds only bf16 GEMMs (which would round an F32 copy to the
  // same values: half the bytes, no conversion pass per GEMM) or SwiGLU's backward (dout: the
  // grouped GEMM's bf16 products written as they are). dxs, the sum of the gate and up products,
  // stays F32 (the products are rounded, their sum is not), and so do dx and the weight gradients
  // (fp32 accumulation).
  const DType act = saved.gate.dtype();

  // Unpermute's backward without the combine weights: slot s of token t gets dy[t]. The down
  // projection's backward then gives dout_s = W_down^T dy[t], the gradient of the slot's
  // weighted h per unit weight, from which swiglu_scaled_backward takes both the combine weight's
  // gradient (dout_s . h_s = dy[t] . expert_out_s) and dgate, dup (of w_s dout_s). Each
  // intermediate, and each saved activation, is dropped once its last reader is queued (the next
  // allocation may reuse it), which lowers the peak of a training step.
  prof.next("moe.bwd.gather");
  Tensor dys = Tensor::empty({N, H}, act, dev);
  be.gather_rows(dys, dy, plan.slot_token, nullptr);
  prof.next("moe.bwd.down");
  Tensor dout = Tensor::empty({N, I}, act, dev);
  be.grouped_matmul(dout, dys, weights(be, routed_experts, &MLP::down_proj, N), begin, false, 0.0f);
  dys = Tensor();
  prof.next("moe.bwd.swiglu");
  Tensor dgate = Tensor::empty({N, I}, act, dev), dup = Tensor::empty({N, I}, act, dev);
  Tensor dw_slot = Tensor::empty({N}, DType::F32, dev);
  be.swiglu_scaled_backward(dgate, dup, dw_slot, dout, saved.gate, saved.up, plan.slot_weight);
  dout = Tensor();
  // Combine weights: dL/dw of slot s, scattered back to [T, K] order by slot_pair (a permutation:
  // every pair receives exactly one slot; padding slots none).
  prof.next("moe.bwd.combine");
  Tensor dtopk = Tensor::zeros({T, K}, DType::F32, dev);
  Tensor dtopk_rows = dtopk.reshape({T * K, 1});
  be.scatter_add_rows(dtopk_rows, dw_slot.reshape({N, 1}), plan.slot_pair, nullptr);
  prof.next("moe.bwd.wgrad");
  if (const Compaction c = compaction(be, *this, dev); !c.t.experts.empty())
    trainable_expert_grads(
        be, *this, dy, c,
        {compact_rows(be, saved.gate, c.index, c.t), compact_rows(be, saved.up, c.index, c.t),
         compact_rows(be, dgate, c.index, c.t), compact_rows(be, dup, c.index, c.t)});
  saved.gate = Tensor();
  saved.up = Tensor();
  if (!dx.defined()) {  // the router trains, nothing below does: its weight gradient alone
    saved.x = Tensor();
    prof.next("moe.bwd.shared");
    if (has_shared) shared_experts.backward(be, dx, dy, false);
    prof.next("moe.bwd.route");
    gate.backward(be, dx, dtopk);
    return;
  }
  // dxs = dgate @ W_gate + dup @ W_up over the same groups: one call (one launch where the
  // backend can, and one pass writing dxs instead of two).
  prof.next("moe.bwd.gate_up");
  Tensor dxs = Tensor::empty({N, H}, DType::F32, dev);
  const std::vector<const Tensor*> w_gate = weights(be, routed_experts, &MLP::gate_proj, N),
                                   w_up = weights(be, routed_experts, &MLP::up_proj, N);
  const GroupedTerm terms[] = {{&dgate, w_gate}, {&dup, w_up}};
  be.grouped_matmul_sum(dxs, terms, begin, false, 0.0f);
  dgate = Tensor();
  dup = Tensor();
  saved.x = Tensor();

  prof.next("moe.bwd.shared");
  if (has_shared) {
    shared_experts.backward(be, dx, dy, accumulate);
  } else if (!accumulate) {
    be.fill(dx, 0.0f);
  }
  prof.next("moe.bwd.scatter");
  be.combine_slots(dx, dxs, plan.slot_token, plan.token_slots, nullptr);
  prof.next("moe.bwd.route");
  gate.backward(be, dx, dtopk);
}

bool MoE::trains() const {
  if (gate.trains() || (has_shared && shared_experts.trains())) return true;
  for (const MLP& e : routed_experts)
    if (e.trains()) return true;
  return false;
}

}  // namespace moekit
